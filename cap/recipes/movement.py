"""CAP-m and CAP-soft (spec §4 CAP-m/soft, §5.2-5.4): movement pruning with PrC/SnC/FiC banks, one training run.

Scores S on the 72 encoder matrices learn with their own optimizer group; the level (Top-K keep fraction for
CAP-m, sigmoid threshold for CAP-soft) follows the cubic schedule, set before every update. At the start of
epoch 0 the (dense) model is encoded into PrC, at the start of every later epoch appended to SnC. Every epoch is
evaluated at the final level. Epoch checkpoints hold weights, scores, optimizer and schedule position; banks are
saved beside them, so a killed run resumes.

A schedule that cannot prune within the run's updates is refused before anything is trained (`check_schedule`); a
run that ends far from the sparsity its config aims at says so, in the log and on its final metrics rows."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from cap import tracking
from cap.banks import build_banks, encode_into, load_banks, load_or_encode, save_banks
from cap.data import get_task, read_glue_split
from cap.errors import UserError
from cap.evaluation import evaluate_task
from cap.io import (CrashPoints, append_metrics, crash_point, file_problem, first_problem, last_complete_checkpoint,
                    process_rank, publish_dir, read_json, remove_checkpoints, save_tensors_atomic, write_json_atomic)
from cap.pruning.movement import (CRITERIA, MovementScores, SparsityController, lambda_schedule, schedule_phases,
                                  threshold_schedule)
from cap.recipes import nominal_sparsity
from cap.recipes.common import (contrast_settings, ensure_teacher, loss_weights, metric_rows, prepare,
                                training_arguments)
from cap.sparse import save_sparse
from cap.trainer import CAPTrainer

CONTROLLER_FILE = "sparsity_controller.safetensors"
SHORT_RAMP = 0.1         # a ramp over fewer of the updates is warned about (the paper's QQP schedule ramps over 52 %)
OFF_NOMINAL = 0.005      # a final sparsity further than this from the nominal one is warned about
NOTHING_PRUNED = 0.01    # ... and, without a nominal one (CAP-soft without a target), a final sparsity below this


def check_levels(p) -> None:
    if p.criterion in ("topk", "magnitude") and not (0 < p.final <= p.initial <= 1):
        raise UserError(f"prune.final={p.final}: the Top-K keep fraction must satisfy 0 < final <= initial "
                        f"({p.initial}) <= 1 (0.1 keeps 10 %, i.e. 90 % sparsity)")
    if p.criterion == "soft" and not (0 <= p.initial <= p.final < 1):
        raise UserError(f"prune.final={p.final}: the soft threshold must satisfy 0 <= initial <= final < 1")
    if p.criterion not in CRITERIA:
        raise UserError(f"prune.criterion={p.criterion}: use topk (CAP-m), soft (CAP-soft) or magnitude (Top-K of |W|)")
    if p.target_sparsity is not None and (p.criterion != "soft" or not 0 < p.target_sparsity < 1):
        raise UserError("prune.target_sparsity needs prune.criterion=soft (CAP-soft) and a value in (0, 1)")


def planned_updates(cfg: DictConfig, n_train: int | None, world_size: int) -> tuple[int, int] | None:
    """(T, W): the optimizer updates the Trainer runs on `n_train` training features over `world_size` processes,
    and the schedule's W (trainer.warmup: a fraction of T when < 1, else a number of updates); None when T depends
    on an unknown `n_train`."""
    t = cfg.trainer
    if t.max_steps > 0:
        total = t.max_steps
    elif n_train is None:
        return None
    else:
        total = math.ceil(n_train / (t.batch_size * world_size)) * math.ceil(t.epochs)
    return total, int(t.warmup * total) if t.warmup < 1 else int(t.warmup)


def training_rows(cfg: DictConfig) -> int | None:
    """The number of training features, counted without tokenising: one per GLUE row; None for SQuAD (its windows
    are known once tokenised) and for a data.max_train_samples that the data loader refuses with its own message."""
    spec, n = get_task(cfg.task.name), cfg.data.max_train_samples
    if spec.is_qa or (n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1)):
        return None
    rows = len(read_glue_split(cfg.data.dir, spec.name, cfg.data.train_split, split_option="data.train_split"))
    return rows if n is None else min(n, rows)


def check_schedule(cfg: DictConfig, total_steps: int, warmup_steps: int) -> str | None:
    """UserError when the cubic schedule cannot prune during the run's `total_steps` updates (it would train dense,
    then be evaluated and saved at the final level), or when it has no ramp (the level would jump to the final one
    in one update); a warning, returned, when the ramp is short."""
    p, t = cfg.prune, cfg.trainer
    initial, ramp, _ = schedule_phases(total_steps=total_steps, warmup_steps=warmup_steps,
                                       initial_warmup=p.initial_warmup, final_warmup=p.final_warmup)
    if ramp >= max(SHORT_RAMP * total_steps, 1):
        return None
    W = warmup_steps
    if t.max_steps > 0:
        updates, longer = f"{total_steps} updates (trainer.max_steps={t.max_steps})", "trainer.max_steps"
    else:
        epochs = f"{t.epochs} epoch{'s' if t.epochs != 1 else ''}"
        updates, longer = f"{total_steps} updates ({epochs} of {total_steps // math.ceil(t.epochs)})", "trainer.epochs"
    w = f"W = trainer.warmup·T = {t.warmup}·{total_steps} = {W}" if t.warmup < 1 else f"W = trainer.warmup = {W}"
    phases = (f"prune.initial_warmup·W = {p.initial_warmup}·{W} = {p.initial_warmup * W:g} updates at the initial "
              f"level and prune.final_warmup·W = {p.final_warmup}·{W} = {p.final_warmup * W:g} at the final one")
    fix = f"train longer ({longer})"
    if p.initial_warmup + p.final_warmup > 0:
        fraction = float(f"{0.5 / (p.initial_warmup + p.final_warmup):.2g}")  # ramps over about half the run
        fix = (f"give W as a fraction of the updates (trainer.warmup={fraction}: W={int(fraction * total_steps)}), "
               f"lower prune.initial_warmup / prune.final_warmup, or {fix}")
    if initial == total_steps:
        raise UserError(f"the pruning schedule does not fit the run: {phases}, but the run has only {updates}, so "
                        f"pruning would never start: the model would train dense, then be evaluated and saved at the "
                        f"final level ({w}). Fix: {fix}")
    if ramp == 0:
        raise UserError(f"the pruning schedule does not fit the run: {phases} leave none of the run's {updates} to "
                        f"the cubic ramp between them: the level would jump to the final one at update {initial} "
                        f"({w}). Fix: {fix}")
    return (f"the pruning schedule ramps from the initial to the final level over only {ramp} of the run's "
            f"{updates}, {100 * ramp / total_steps:.0f} % of them (the paper's QQP schedule: about half), so pruning "
            f"is nearly one-shot: {phases} ({w}). To ramp longer: {fix}")


def sparsity_warning(cfg: DictConfig, measured: float, controller: SparsityController | None) -> str | None:
    """Why the run's final sparsity (the fraction of the encoder matrices' entries masked) is far from the one its
    config aims at (`nominal_sparsity`), or None when it is not."""
    if controller is not None:
        return controller.missed(measured)
    p, nominal = cfg.prune, nominal_sparsity(cfg)
    if nominal is None:
        if measured >= NOTHING_PRUNED:
            return None
        return (f"the run ended at {measured:.4f} sparsity: it pruned (almost) nothing. CAP-soft prunes a weight "
                f"once its score falls below logit(prune.final={p.final}), pushed by λ "
                f"(prune.final_lambda={p.final_lambda}) at a pace that the scores' learning rate "
                f"(prune.score_lr={p.score_lr}) bounds: raise them or trainer.epochs, or set prune.target_sparsity to "
                "have λ steered there")
    if abs(measured - nominal) <= OFF_NOMINAL:
        return None
    return (f"the run ended at {measured:.4f} sparsity, {100 * (measured - nominal):+.2f} points from the nominal "
            f"{nominal:g} (1 - prune.final): Top-K keeps int(prune.final·size) entries of every matrix, so only very "
            "small matrices round this far")


def record_warnings(run_dir: Path, notes: list[str]) -> None:
    """Put `notes` on the metrics.json rows of the last evaluated epoch (`warnings`): the results say how a run
    went wrong, not only the log."""
    path = run_dir / "metrics.json"
    rows = read_json(path, [])
    if not rows:
        return
    for row in rows:
        if row.get("stage") == rows[-1].get("stage"):
            row["warnings"] = notes
    write_json_atomic(path, rows)


class MovementSchedule(TrainerCallback):
    """Sets the pruning level (and λ) before every update; encodes PrC/SnC at the start of every epoch."""

    def __init__(self, cfg, scores, banks, bank_dir, data, collator, total_steps, warmup_steps, controller):
        self.cfg, self.scores, self.banks, self.bank_dir = cfg, scores, banks, bank_dir
        self.data, self.collator, self.controller = data, collator, controller
        p = cfg.prune
        self.schedule = dict(total_steps=total_steps, warmup_steps=warmup_steps, initial=p.initial, final=p.final,
                             initial_warmup=p.initial_warmup, final_warmup=p.final_warmup)
        self.lam = 0.0

    def level(self, step: int) -> float:
        return threshold_schedule(step, **self.schedule)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        level = self.level(state.global_step)
        self.scores.set_level(level)
        p = self.cfg.prune
        if p.criterion == "soft":
            if self.controller is not None:
                lr = kwargs["optimizer"].param_groups[-1]["lr"]  # the scores' group
                self.lam = self.controller.update(self.scores.score_parameters(), state.global_step, lr,
                                                  active=level > p.initial)
            else:
                self.lam = lambda_schedule(level, final_lambda=p.final_lambda, final=p.final)

    def log_values(self) -> dict[str, float]:
        return {"prune_level": self.scores.level, "prune_lambda": self.lam,
                "sparsity_entries": self.scores.sparsity()["entries"]}

    def on_save(self, args, state, control, **kwargs):
        # written after the Trainer's files: a checkpoint without it is incomplete (see CONTROLLER_FILE in run)
        if self.controller is not None and process_rank() == 0:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_tensors_atomic(self.controller.state_dict(), folder / CONTROLLER_FILE)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if not self.banks:
            return
        epoch = round(state.epoch or 0)
        self.scores.set_level(self.level(max(state.global_step - 1, 0)))  # the last level used in training
        name = "prc" if epoch == 0 else "snc"
        load_banks({k: b for k, b in self.banks.items() if file_problem(self.bank_dir / f"{k}.safetensors") is None},
                   self.bank_dir)
        # saved banks may hold more than this epoch starts from (an attempt that got further, then was killed): keep
        # PrC from epoch 1 on and one SnC snapshot per earlier epoch but the first; this epoch's is encoded again
        for key, count in (("prc", int(epoch > 0)), ("snc", max(epoch - 1, 0))):
            if key in self.banks:
                self.banks[key].n_reps = min(self.banks[key].n_reps, count)
        if name not in self.banks:
            return
        bank = self.banks[name]
        encode_into(bank, model, self.data.train, self.collator, pooling=self.cfg.contrast.pooling,
                    batch_size=self.cfg.trainer.eval_batch_size, precision=self.cfg.trainer.precision,
                    train_mode=epoch > 0 and self.cfg.bank.snapshot_train_mode, seed=self.cfg.seed + epoch,
                    desc=f"{name} bank")
        save_banks({name: bank}, self.bank_dir)  # rank 0 writes
        crash_point("bank_encoded")


class EpochEvaluation(TrainerCallback):
    """Evaluates at the final level after every epoch: one metrics.json row per split, with the sparsity."""

    def __init__(self, cfg, scores, data, run_dir, method):
        self.cfg, self.scores, self.data, self.run_dir, self.method = cfg, scores, data, run_dir, method
        self.trainer = None

    def on_epoch_end(self, args, state, control, **kwargs):
        training_level = self.scores.level
        self.scores.set_level(self.cfg.prune.final)
        results = evaluate_task(self.trainer, self.data, out_dir=self.run_dir if process_rank() == 0 else None)
        sparsity = self.scores.sparsity()
        rows = metric_rows(results, stage=round(state.epoch), method=self.method, step=state.global_step,
                           sparsity=round(sparsity["entries"], 6),
                           **{f"sparsity_{k}": round(v, 6) for k, v in sparsity.items()})
        self.scores.set_level(training_level)
        if process_rank() == 0:
            append_metrics(self.run_dir, rows)  # replaces the rows of an epoch evaluated before a crash
        crash_point("epoch_evaluated")
        self.trainer.log({f"{r['split']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, float)})


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    p = cfg.prune
    check_levels(p)
    model_dir = run_dir / "model"
    if cfg.trainer.resume and (model_dir / "config.json").exists() and (run_dir / "sparse").exists():
        print(f"already finished: {run_dir} (trainer.resume=false starts over)")
        if process_rank() == 0 and not cfg.trainer.keep_checkpoints:  # finishes a deletion that a kill cut short
            remove_checkpoints(run_dir / "checkpoints")
        return read_json(run_dir / "metrics.json", [])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not cfg.teacher.path:  # a teacher is fine-tuned first: refuse a schedule that cannot fit before that
        planned = planned_updates(cfg, None, world_size) or planned_updates(cfg, training_rows(cfg), world_size)
        if planned:
            check_schedule(cfg, *planned)
    setup = prepare(cfg, teacher_path=ensure_teacher(cfg))
    model, data = setup.model, setup.data
    total_steps, warmup_steps = planned_updates(cfg, len(data.train), world_size)
    short_ramp = check_schedule(cfg, total_steps, warmup_steps)
    notes = [short_ramp] if short_ramp else []  # also written onto the final metrics rows
    if short_ramp:
        warnings.warn(short_ramp, stacklevel=1)
    scores = MovementScores.attach(model, p.criterion)
    labels = None if data.spec.is_qa or data.spec.is_regression else torch.tensor(data.train["labels"])
    banks = build_banks(cfg, len(data.train), model.config.hidden_size, labels, max(cfg.trainer.epochs - 1, 0))
    report_to = tracking.start(cfg, run_dir)
    args = training_arguments(cfg, run_dir / "checkpoints", report_to)
    controller = None
    if p.target_sparsity is not None:
        controller = SparsityController(p.target_sparsity, p.final_lambda, p.final, total_steps)
    resume_from = None
    if cfg.trainer.resume:
        resume_from = last_complete_checkpoint(run_dir / "checkpoints",
                                               required=(CONTROLLER_FILE,) if controller else ())
        # a resumed epoch starts from the PrC/SnC snapshots saved beside the checkpoints: without them, start over
        snapshots = {k: run_dir / "banks" / f"{k}.safetensors" for k in ("prc", "snc") if k in banks}
        problem = resume_from and first_problem(path for k, path in snapshots.items() if k == "prc" or path.exists())
        if problem:
            print(f"{problem}: training starts over")
            resume_from = None
        if controller is not None and resume_from:
            controller.load_state_dict(load_file(str(Path(resume_from) / CONTROLLER_FILE)))
    schedule = MovementSchedule(cfg, scores, banks, run_dir / "banks", data, setup.collator, total_steps,
                                warmup_steps, controller)
    evaluation = EpochEvaluation(cfg, scores, data, run_dir, cfg.method.name)
    regularizer = (lambda: schedule.lam * scores.regularization()) if p.criterion == "soft" else None
    optimizer = torch.optim.AdamW(scores.param_groups(lr=args.learning_rate, weight_decay=args.weight_decay,
                                                      score_lr=p.score_lr), eps=args.adam_epsilon)
    trainer = CAPTrainer(model=model, args=args, train_dataset=data.train, data_collator=setup.collator,
                         processing_class=setup.tokenizer, weights=loss_weights(cfg), teacher=setup.teacher,
                         banks=banks, contrast=contrast_settings(cfg), regularizer=regularizer,
                         log_extras=schedule.log_values,
                         draw_seed=cfg.seed + 1000 * process_rank(),
                         optimizers=(optimizer, None), callbacks=[schedule, evaluation, CrashPoints()])
    evaluation.trainer = trainer
    load_or_encode("fic", banks, run_dir / "banks", trainer.teacher, data.train, setup.collator,
                   pooling=cfg.contrast.pooling, batch_size=cfg.trainer.eval_batch_size, precision=cfg.trainer.precision)
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.release()

    # fold the scores into hard zeros at the final level: a stock model, saved dense and compact
    scores.set_level(p.final)
    if miss := sparsity_warning(cfg, scores.sparsity()["entries"], controller):
        warnings.warn(miss, stacklevel=1)
        notes.append(miss)
    if notes and process_rank() == 0:
        record_warnings(run_dir, notes)
    scores.fold()
    if process_rank() == 0:
        tmp = run_dir / "model.tmp"
        model.save_pretrained(tmp)
        setup.tokenizer.save_pretrained(tmp)
        publish_dir(tmp, model_dir)
        crash_point("model_published")
        save_sparse(model, run_dir / "sparse.tmp", tokenizer=setup.tokenizer)
        publish_dir(run_dir / "sparse.tmp", run_dir / "sparse")
        if not cfg.trainer.keep_checkpoints:
            remove_checkpoints(run_dir / "checkpoints")
    tracking.finish()
    return read_json(run_dir / "metrics.json", [])
