"""CAP-f (spec §4 CAP-f, §5.1): iterative structured pruning with PrC/SnC/FiC banks.

For each target sparsity: importance with the current loss -> choose the new heads/neurons -> encode the current
model (old masks) into PrC (first step) or SnC -> apply the masks -> retrain with a fresh optimizer -> evaluate ->
save the stage (its model folded: `from_pretrained` gives the pruned model) and delete its Trainer checkpoints. The
last stage's model is the run's `model/`. A killed run resumes at the stage it was in: the selection (masks, banks)
is saved before retraining, and retraining resumes from its last complete checkpoint; a saved file found damaged
is reported and the step that wrote it done again."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from cap import tracking
from cap.banks import build_banks, encode_into, load_banks, load_or_encode, rank_and_world, save_banks
from cap.errors import UserError
from cap.evaluation import evaluate_task
from cap.io import (CrashPoints, append_metrics, crash_point, first_problem, last_complete_checkpoint, process_rank,
                    publish_dir, publish_linked, read_json, remove_checkpoints, save_tensors_atomic,
                    write_json_atomic)
from cap.pruning import (StructuredMasks, compute_importance, mask_shapes, normalize_by_layer, pruning_targets,
                         select_heads, select_neurons)
from cap.recipes.common import (contrast_settings, ensure_teacher, loss_weights, metric_rows, prepare,
                                training_arguments)
from cap.trainer import CAPTrainer


def check_sequence(sequence) -> list[float]:
    seq = [float(p) for p in sequence]
    if not seq or any(not 0 < p < 1 for p in seq) or any(b <= a for a, b in zip(seq, seq[1:])):
        raise UserError(f"prune.sequence={seq}: use increasing sparsities strictly between 0 and 1, "
                        "e.g. prune.sequence=[0.1,0.2,0.3]")
    return seq


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    sequence = check_sequence(cfg.prune.sequence)
    if not 0 < cfg.prune.importance_fraction <= 1:
        raise UserError(f"prune.importance_fraction={cfg.prune.importance_fraction}: use a value in (0, 1]")
    setup = prepare(cfg, teacher_path=ensure_teacher(cfg))
    model, data = setup.model, setup.data
    n_layers, n_heads, n_neurons = mask_shapes(model)
    targets = pruning_targets(n_layers * n_heads, n_layers * n_neurons, sequence)
    masks = StructuredMasks.from_model(model).apply(model)
    labels = None if data.spec.is_qa or data.spec.is_regression else torch.tensor(data.train["labels"])
    banks = build_banks(cfg, len(data.train), model.config.hidden_size, labels, len(sequence) - 1)
    encode = dict(pooling=cfg.contrast.pooling, batch_size=cfg.trainer.eval_batch_size,
                  precision=cfg.trainer.precision)
    report_to = tracking.start(cfg, run_dir)
    draw_seed = cfg.seed + 1000 * process_rank()  # extras differ per rank (Q4)
    device = training_arguments(cfg, run_dir, []).device  # also joins the process group under torchrun/accelerate
    main_process = process_rank() == 0  # only rank 0 writes files; every rank holds the same masks and banks
    model.to(device)
    load_or_encode("fic", banks, run_dir / "banks", setup.teacher.to(device), data.train, setup.collator, **encode)

    rows, trained = [], False
    for step, (sparsity, (n_head_target, n_neuron_target)) in enumerate(zip(sequence, targets)):
        stage_dir = run_dir / "stages" / f"{sparsity:g}"
        # every rank sees the same files: rank 0 writes this stage's after collectives (importance, training)
        # that no rank reaches before these checks
        if cfg.trainer.resume and (stage_dir / "DONE").exists():
            problem = first_problem([stage_dir / "DONE", *stage_files(stage_dir), *selection_files(stage_dir, banks)])
            if problem is None:
                restore_stage(stage_dir, model, masks, banks)
                rows += read_json(stage_dir / "DONE")["rows"]
                if main_process and not cfg.trainer.keep_checkpoints:
                    remove_checkpoints(stage_dir / "checkpoints")  # what a kill during the deletion left
                continue
            print(f"{problem}: redoing stage {sparsity:g}")
            if main_process:  # until the stage is redone, its files need not belong together
                (stage_dir / "DONE").unlink()
        trained = True
        args = training_arguments(cfg, stage_dir / "checkpoints", report_to)
        args.num_train_epochs = cfg.prune.retrain_epochs
        trainer = CAPTrainer(model=model, args=args, train_dataset=data.train, data_collator=setup.collator,
                             processing_class=setup.tokenizer, weights=loss_weights(cfg), teacher=setup.teacher,
                             banks=banks, contrast=contrast_settings(cfg), draw_seed=draw_seed,
                             callbacks=[CrashPoints()])
        selected = stage_dir / "selected"
        resumable = cfg.trainer.resume and selected.exists()
        problem = first_problem(selection_files(stage_dir, banks)) if resumable else None
        if problem:
            print(f"{problem}: choosing the heads and neurons of stage {sparsity:g} again")
        if resumable and not problem:
            masks.load_state_dict(load_file(str(selected / "masks.safetensors")))
            load_banks(banks, selected)
        else:
            # importance uses the banks as they were after the previous step: none at the first (spec §4)
            # subsets seeded per step: the same on every rank, and a resumed run draws what an uninterrupted one did;
            # a forked RNG: a resumed stage loads its selection, and must then train as if it had made it
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                new, importance = choose_units(cfg, trainer, model, masks, data.train, setup.collator,
                                               torch.Generator().manual_seed(cfg.seed + step), n_head_target,
                                               n_neuron_target, contrast=step > 0)
            crash_point("importance_done")
            # the current model, before the new masks, becomes PrC (first step) or the next SnC snapshot (§4)
            name = "prc" if step == 0 else "snc"
            if name in banks:
                encode_into(banks[name], model, data.train, setup.collator, desc=f"{name} bank",
                            train_mode=False, **encode)
            masks.load_state_dict(new)
            if main_process:
                tmp = stage_dir / "selected.tmp"
                save_banks(banks, tmp)
                save_file(masks.state_dict(), str(tmp / "masks.safetensors"))
                save_file(importance, str(tmp / "importance.safetensors"))  # for users who look at it; not resumed
                publish_dir(tmp, selected)
            crash_point("selected_saved")
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(stage_dir / "checkpoints")
                      if cfg.trainer.resume else None)
        results = evaluate_task(trainer, data, out_dir=stage_dir if main_process else None)  # QA predictions
        trainer.release()
        stage_rows = metric_rows(results, stage=step, method="cap_f", sparsity=sparsity, step=trainer.state.global_step,
                                 **{f"sparsity_{k}": round(v, 6) for k, v in masks.sparsity().items()})
        if main_process:
            save_stage(stage_dir, model, masks, setup.tokenizer)
            append_metrics(run_dir, stage_rows)
            crash_point("stage_saved")
            write_json_atomic(stage_dir / "DONE", {"rows": stage_rows})
            if not cfg.trainer.keep_checkpoints:
                remove_checkpoints(stage_dir / "checkpoints")
            print(f"sparsity {sparsity:g}: " + ", ".join(f"{r['split']} " + " ".join(
                f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float) and not k.startswith("sparsity"))
                for r in stage_rows))
        rows += stage_rows
        trainer.log({f"{r['split']}/{k}": v for r in stage_rows for k, v in r.items() if isinstance(v, float)})
    if main_process and (trained or not (run_dir / "model" / "model.safetensors").exists()):
        publish_linked(stage_dir / "model", run_dir / "model")  # the run's model: the last, most pruned stage
        crash_point("model_published")
    if not trained:
        print(f"already finished: {run_dir} (trainer.resume=false starts over)")
    tracking.finish()
    return rows


def choose_units(cfg, trainer, model, masks, train, collator, generator, n_head_target, n_neuron_target, contrast):
    """(new masks, the importance they were chosen by): first-order importance with the full current loss (eval
    mode), normalised per layer when `prune.normalize_by_layer` (§5.1); `head_importance` [L, A], `ffn_importance`
    [L, F], on the CPU."""
    p = cfg.prune
    rows = list(range(len(train)))
    if p.importance_fraction < 1:
        keep = torch.randperm(len(train), generator=generator)[: max(1, int(p.importance_fraction * len(train)))]
        rows = sorted(keep.tolist())
    # rank r of w takes batches r, r+w, ...; compute_importance sums over the batches of all ranks, so the
    # importance is that of one process passing every batch
    rank, world = rank_and_world()
    size = p.importance_batch_size
    shares = [rows[i:i + size] for i in range(0, len(rows), size)][rank::world]
    loader = DataLoader(train, batch_sampler=shares, collate_fn=collator)
    device = next(model.parameters()).device
    batches = ({k: v.to(device) for k, v in b.items()} for b in loader)

    def loss_fn(model, batch):
        terms, _ = trainer.loss_terms(model, batch, contrast=contrast)
        return trainer.weighted(terms)

    head_imp, ffn_imp = compute_importance(model, masks, batches, loss_fn, desc=None if rank else "importance")
    if p.normalize_by_layer:
        head_imp, ffn_imp = normalize_by_layer(head_imp), normalize_by_layer(ffn_imp)
    head_mask, ffn_mask = masks.head_mask, masks.ffn_mask
    new_heads = select_heads(head_imp, head_mask, n_head_target - int((head_mask == 0).sum()),
                             min_heads_per_layer=p.min_heads_per_layer, legacy_floor=p.legacy_head_floor)
    new_ffn = select_neurons(ffn_imp, ffn_mask, n_neuron_target - int((ffn_mask == 0).sum()),
                             min_per_layer=p.min_ffn_per_layer)
    importance = {"head_importance": head_imp.detach().cpu(), "ffn_importance": ffn_imp.detach().cpu()}
    return {"head_mask": new_heads.cpu(), "ffn_mask": new_ffn.cpu()}, importance


def selection_files(stage_dir: Path, banks) -> list[Path]:
    """What a stage's `selected/` holds: its masks and the banks as they were when they were chosen."""
    return [stage_dir / "selected" / f"{name}.safetensors" for name in ("masks", *banks)]


def stage_files(stage_dir: Path) -> list[Path]:
    """What a finished stage leaves besides `selected/`: the folded model, the weights folding zeroed, the masks."""
    return [stage_dir / "model" / "model.safetensors", stage_dir / "masked_weights.safetensors",
            stage_dir / "masks.safetensors"]


def save_stage(stage_dir: Path, model, masks, tokenizer) -> None:
    """Save the stage's model folded: `from_pretrained` on `stage_dir/model` gives the pruned model, no hooks needed.

    The live model stays unfolded, as the original's: the next importance pass sees the masked units' weights
    (their importance is not 0, and counts in the per-layer normalisation, §5.1). The zeroed rows go to
    `masked_weights.safetensors`, from which a resumed run restores the live model to the bit."""
    zeroed = masks.fold(model)
    tmp = stage_dir / "model.tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    masks.unfold(model, zeroed)
    publish_dir(tmp, stage_dir / "model")
    save_tensors_atomic(zeroed, stage_dir / "masked_weights.safetensors")
    save_tensors_atomic(masks.state_dict(), stage_dir / "masks.safetensors")


def restore_stage(stage_dir: Path, model, masks, banks) -> None:
    """Weights (unfolded), masks and banks as they were at the end of a finished stage."""
    model.load_state_dict(load_file(str(stage_dir / "model" / "model.safetensors")))
    masks.load_state_dict(load_file(str(stage_dir / "masks.safetensors")))
    masks.unfold(model, load_file(str(stage_dir / "masked_weights.safetensors")))
    load_banks(banks, stage_dir / "selected")
