"""CAP-f (spec §4 CAP-f, §5.1): iterative structured pruning with PrC/SnC/FiC banks.

`run` is the paper's loop. Before it, the teacher is encoded into FiC. Then, for each target sparsity: importance
with the current loss -> choose the new heads/neurons -> encode the current model (old masks) into PrC (first step)
or SnC -> apply the masks -> retrain with a fresh optimizer -> evaluate. What each stage saves, and how a killed
run resumes at the stage it was in (the selection is saved before retraining, retraining resumes from its last
complete checkpoint, a damaged file is reported and the step that wrote it done again), is `cap.stages`."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from cap import tracking
from cap.banks import BankSettings, build_banks, encode_snapshot
from cap.distributed import this_process
from cap.evaluation import evaluate_task
from cap.io import CrashPoints, crash_point
from cap.methods import metric_rows, training_arguments
from cap.pruning import (Packing, StructuredMasks, compute_importance, mask_shapes, normalize_by_layer, pruning_targets,
                         select_heads, select_neurons)
from cap.recipes.common import prepare, pruning_trainer
from cap.recipes.finetune import ensure_teacher
from cap.stages import StageSettings, StructuredStage, already_finished
from cap.teacher import TeacherPassSettings, teacher_pass


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    sequence = [float(p) for p in cfg.prune.sequence]  # checked before (cap.checks.validate)
    setup = prepare(cfg, teacher_path=ensure_teacher(cfg))
    model, data, bank_settings = setup.model, setup.data, BankSettings.from_config(cfg)
    stage_settings = StageSettings.from_config(cfg)
    n_layers, n_heads, n_neurons = mask_shapes(model)
    targets = pruning_targets(n_layers * n_heads, n_layers * n_neurons, sequence)
    masks = StructuredMasks.from_model(model).apply(model)
    banks = build_banks(bank_settings, data, model.config.hidden_size, len(sequence) - 1)
    tracked = tracking.TrackingSettings.from_config(cfg)
    report_to = tracking.start(tracked, run_dir)
    device = training_arguments(cfg, run_dir, []).device  # also joins the process group under torchrun/accelerate
    model.to(device)
    # FiC: the fine-tuned teacher, encoded once (§4); with teacher.cache_outputs its logits from the same pass
    teacher_outputs = teacher_pass(TeacherPassSettings.from_config(cfg), setup, banks, run_dir / "banks", device)

    rows, trained = [], False
    for step, (sparsity, target) in enumerate(zip(sequence, targets)):
        stage = StructuredStage(run_dir, sparsity, stage_settings, banks)
        if stage.done():  # finished by an earlier attempt: its weights, masks and banks as it left them
            rows += stage.restore(model, masks)
            continue
        trained = True
        # W&B: one x-axis over the stages, the updates of the earlier stages (each Trainer counts from 0)
        earlier = sum({r["stage"]: r["step"] for r in rows}.values())
        trainer = stage_trainer(cfg, setup, stage, banks, report_to, teacher_outputs, update_offset=earlier)
        if not stage.load_selection(masks):  # a stage killed while retraining keeps the masks and banks it chose
            head_imp, ffn_imp = unit_importance(cfg, trainer, setup, masks, step)  # §5.1, with the current loss
            new, importance = choose_units(cfg, masks, head_imp, ffn_imp, target)  # the least important go
            # the current model, old masks, becomes PrC (first step) or the next SnC snapshot
            encode_snapshot(banks, step, model, data.train, setup.collator, train_mode=False,
                            **bank_settings.encoding)
            masks.load_state_dict(new)  # the new masks applied
            stage.save_selection(masks, importance)
        trainer.train(resume_from_checkpoint=stage.checkpoint())  # retrained with the banks, a fresh optimizer
        stage_rows = evaluate_stage(trainer, data, masks, step, sparsity, stage)
        stage.save_result(model, masks, setup.tokenizer, stage_rows)
        rows += stage_rows
    stage.publish_model(again=trained)  # the run's model: the last, most pruned stage
    if not trained:
        print(already_finished(run_dir))
    tracking.log_models(tracked, run_dir)  # logger.log_model=true; the main process (the one W&B runs in)
    tracking.finish()
    return rows


def stage_trainer(cfg, setup, stage, banks, report_to, teacher_outputs=None, update_offset: int = 0):
    """The step's Trainer: `prune.retrain_epochs` epochs with a fresh optimizer, its checkpoints in the stage."""
    args = training_arguments(cfg, stage.checkpoints, report_to)
    args.num_train_epochs = cfg.prune.retrain_epochs
    logs = tracking.callbacks(report_to, stage.run_dir, update_offset)  # the run's log, one x-axis
    return pruning_trainer(cfg, setup, args, banks, callbacks=[CrashPoints(), *logs],
                           teacher_outputs=teacher_outputs, update_offset=update_offset)


def evaluate_stage(trainer, data, masks, step: int, sparsity: float, stage) -> list[dict]:
    """The step's metrics rows, with both sparsity definitions (Q13), printed and logged; QA predictions in the
    stage."""
    results = evaluate_task(trainer, data, out_dir=stage.folder if stage.writes else None)
    trainer.release()
    rows = metric_rows(results, stage=step, method="cap_f", sparsity=sparsity, step=trainer.state.global_step,
                       **{f"sparsity_{k}": round(v, 6) for k, v in masks.sparsity().items()})
    if stage.writes:
        print(f"sparsity {sparsity:g}: " + ", ".join(f"{r['split']} " + " ".join(
            f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float) and not k.startswith("sparsity"))
            for r in rows))
    trainer.log({f"{r['split']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, float)})
    return rows


def unit_importance(cfg, trainer, setup, masks, step: int):
    """(head importance [L, A], FFN importance [L, F]): first-order importance with the full current loss, in eval
    mode, normalised per layer when `prune.normalize_by_layer` (§5.1). The loss has contrastive terms from the
    second step on: the banks as they were after the previous step, none at the first (spec §4)."""
    p, model, train = cfg.prune, setup.model, setup.data.train
    device = next(model.parameters()).device
    # a forked RNG: a resumed stage loads its selection instead, and must then train as if it had made it
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        rows = list(range(len(train)))
        if p.importance_fraction < 1:
            # seeded per step: the same subset on every rank, and a resumed run draws what an uninterrupted one did
            generator = torch.Generator().manual_seed(cfg.seed + step)
            keep = torch.randperm(len(train), generator=generator)[: max(1, int(p.importance_fraction * len(train)))]
            rows = sorted(keep.tolist())
        # rank r of w takes batches r, r+w, ...; compute_importance sums over the batches of all ranks, so the
        # importance is that of one process passing every batch
        rank, world = this_process()
        size = p.importance_batch_size
        every = [rows[i:i + size] for i in range(0, len(rows), size)]
        loader = DataLoader(train, batch_sampler=every[rank::world], collate_fn=setup.collator)
        batches = ({k: v.to(device) for k, v in b.items()} for b in loader)

        # the contrastive extras of batch i are the i-th draws of the step's Trainer, on any number of ranks
        order, drawn = iter(range(rank, len(every), world)), [0]

        def loss_fn(model, batch, outputs=None):
            if step > 0:
                index = next(order)
                trainer.skip_draws(index - drawn[0])  # the other ranks' batches before this one
                drawn[0] = index + 1
            if outputs is not None:  # packed: the batch's examples ran in forwards grouped by length
                return trainer.batch_loss(model, batch, outputs, contrast=step > 0)
            terms, _ = trainer.loss_terms(model, batch, contrast=step > 0)
            return trainer.weighted(terms)

        # with data.group_by_length, the batches' examples run in forwards of similar length (classification: an
        # example's outputs are one row whatever its padding); the batches, and so the sum, stay the spec's
        packed = cfg.data.group_by_length and not setup.data.spec.is_qa
        packing = Packing(trainer.example_outputs, rows=2 * size) if packed else None
        head_imp, ffn_imp = compute_importance(model, masks, batches, loss_fn, desc=None if rank else "importance",
                                               packing=packing)
    if p.normalize_by_layer:
        head_imp, ffn_imp = normalize_by_layer(head_imp), normalize_by_layer(ffn_imp)
    crash_point("importance_done")
    return head_imp, ffn_imp


def choose_units(cfg, masks, head_imp, ffn_imp, target: tuple[int, int]):
    """(new masks, the importance they were chosen by, on the CPU, as `selected/` keeps it): the least important
    heads and FFN neurons up to the step's `target` (how many of each are masked after it), at least
    `prune.min_heads_per_layer` heads kept in each layer (§5.1)."""
    p, (n_head_target, n_neuron_target) = cfg.prune, target
    head_mask, ffn_mask = masks.head_mask, masks.ffn_mask
    new_heads = select_heads(head_imp, head_mask, n_head_target - int((head_mask == 0).sum()),
                             min_heads_per_layer=p.min_heads_per_layer, legacy_floor=p.legacy_head_floor)
    new_ffn = select_neurons(ffn_imp, ffn_mask, n_neuron_target - int((ffn_mask == 0).sum()),
                             min_per_layer=p.min_ffn_per_layer)
    importance = {"head_importance": head_imp.detach().cpu(), "ffn_importance": ffn_imp.detach().cpu()}
    return {"head_mask": new_heads.cpu(), "ffn_mask": new_ffn.cpu()}, importance
