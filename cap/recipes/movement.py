"""CAP-m and CAP-soft (spec §4 CAP-m/soft, §5.2-5.4): movement pruning with PrC/SnC/FiC banks, one training run.

Scores S on the 72 encoder matrices learn with their own optimizer group; the level (Top-K keep fraction for
CAP-m, sigmoid threshold for CAP-soft) follows the cubic schedule, set before every update. At the start of
epoch 0 the (dense) model is encoded into PrC, at the start of every later epoch appended to SnC. Every epoch is
evaluated at the final level. Epoch checkpoints hold weights, scores, optimizer and schedule position; banks are
saved beside them, so a killed run resumes (what is saved, and how it is resumed: `cap.stages.MovementStage`).

A schedule that cannot prune within the run's updates is refused before anything is trained
(`cap.checks.check_schedule`); a run that ends far from the sparsity its config aims at says so, in the log and on
its final metrics rows."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from cap import tracking
from cap.banks import BankSettings, build_banks, encode_snapshot
from cap.checks import check_schedule, planned_updates
from cap.evaluation import evaluate_task
from cap.io import CrashPoints
from cap.methods import metric_rows, nominal_sparsity, training_arguments
from cap.pruning.movement import MovementScores, PruneSchedule, SparsityController
from cap.recipes.common import prepare, pruning_trainer
from cap.recipes.finetune import ensure_teacher
from cap.stages import MovementStage, StageSettings, already_finished
from cap.teacher import TeacherPassSettings, teacher_pass

OFF_NOMINAL = 0.005      # a final sparsity further than this from the nominal one is warned about
NOTHING_PRUNED = 0.01    # ... and, without a nominal one (CAP-soft without a target), a final sparsity below this


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
            f"{nominal:g} (1 - prune.final): Top-K keeps int(prune.final·size) entries of every matrix (or, "
            "structured, whole heads and FFN neurons of every layer), so only very small models round this far")


class MovementSchedule(TrainerCallback):
    """Sets the pruning level (and λ) before every update; encodes PrC/SnC at the start of every epoch."""

    def __init__(self, schedule: PruneSchedule, scores, controller=None, *, banks=None, stage=None, data=None,
                 collator=None, bank_settings: BankSettings | None = None, seed: int = 0):
        self.schedule, self.scores, self.controller = schedule, scores, controller
        self.banks, self.stage, self.data, self.collator = banks or {}, stage, data, collator
        self.bank_settings, self.seed = bank_settings, seed
        self.lam = 0.0

    def level(self, step: int) -> float:
        return self.schedule.level(step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        level = self.level(state.global_step)
        self.scores.set_level(level)
        if self.schedule.criterion == "soft":
            if self.controller is not None:
                lr = kwargs["optimizer"].param_groups[-1]["lr"]  # the scores' group
                scores, weights = self.scores.quantile_inputs()
                self.lam = self.controller.update(scores, state.global_step, lr, active=level > self.schedule.initial,
                                                  weights=weights)
            else:
                self.lam = self.schedule.lam(level)

    def log_values(self) -> dict[str, float]:
        return {"prune_level": self.scores.level, "prune_lambda": self.lam,
                "sparsity_entries": self.scores.sparsity()["entries"]}

    def on_save(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.stage.save_controller(self.controller, state.global_step)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if not self.banks:
            return
        epoch = round(state.epoch or 0)
        self.scores.set_level(self.level(max(state.global_step - 1, 0)))  # the last level used in training
        self.stage.restore_snapshots(self.banks, epoch)  # the banks as this epoch starts from them
        # the current model becomes PrC (epoch 0: the pre-trained model) or the next SnC snapshot (§4)
        settings = self.bank_settings
        name = encode_snapshot(self.banks, epoch, model, self.data.train, self.collator, seed=self.seed + epoch,
                               train_mode=epoch > 0 and settings.snapshot_train_mode, **settings.encoding)
        if name:
            self.stage.save_snapshot(self.banks, name)


class EpochEvaluation(TrainerCallback):
    """Evaluates at the final level after every epoch: one metrics.json row per split, with the sparsity."""

    def __init__(self, final: float, scores, data, stage, method: str):
        self.final, self.scores, self.data, self.stage, self.method = final, scores, data, stage, method
        self.trainer = None

    def on_epoch_end(self, args, state, control, **kwargs):
        training_level = self.scores.level
        self.scores.set_level(self.final)
        results = evaluate_task(self.trainer, self.data, out_dir=self.stage.folder if self.stage.writes else None)
        sparsity = self.scores.sparsity()
        rows = metric_rows(results, stage=round(state.epoch), method=self.method, step=state.global_step,
                           sparsity=round(sparsity["entries"], 6),
                           **{f"sparsity_{k}": round(v, 6) for k, v in sparsity.items()})
        self.scores.set_level(training_level)
        self.stage.save_epoch(rows)
        self.trainer.log({f"{r['split']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, float)})


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    """The config was checked before (`cap.checks.validate`: the levels, and the schedule wherever the number of
    training features is known without tokenising)."""
    p = cfg.prune
    stage = MovementStage(run_dir, StageSettings.from_config(cfg))
    if stage.finished():
        print(already_finished(run_dir))
        return stage.rows()
    setup = prepare(cfg, teacher_path=ensure_teacher(cfg))
    model, data = setup.model, setup.data
    total_steps, warmup_steps = planned_updates(cfg, len(data.train))
    short_ramp = check_schedule(cfg, total_steps, warmup_steps)  # SQuAD's windows are counted only now
    notes = [short_ramp] if short_ramp else []  # also written onto the final metrics rows
    if short_ramp:
        warnings.warn(short_ramp, stacklevel=1)
    scores = MovementScores.attach(model, p.criterion, granularity=p.granularity)
    bank_settings, tracked = BankSettings.from_config(cfg), tracking.TrackingSettings.from_config(cfg)
    banks = build_banks(bank_settings, data, model.config.hidden_size, max(cfg.trainer.epochs - 1, 0))
    args = training_arguments(cfg, stage.checkpoints, tracking.start(tracked, run_dir))
    controller = None
    if p.target_sparsity is not None:
        controller = SparsityController(p.target_sparsity, p.final_lambda, p.final, total_steps)
    resume_from = stage.resume_checkpoint(banks, controller)
    # the epoch loop is the Trainer's: the schedule sets the level before every update and encodes PrC / SnC at
    # the start of every epoch; every epoch is evaluated at the final level
    schedule = MovementSchedule(PruneSchedule.from_config(p, total_steps, warmup_steps), scores, controller,
                                banks=banks, stage=stage, data=data, collator=setup.collator,
                                bank_settings=bank_settings, seed=cfg.seed)
    evaluation = EpochEvaluation(p.final, scores, data, stage, cfg.method.name)
    regularizer = (lambda: schedule.lam * scores.regularization()) if p.criterion == "soft" else None
    optimizer = torch.optim.AdamW(scores.param_groups(lr=args.learning_rate, weight_decay=args.weight_decay,
                                                      score_lr=p.score_lr), eps=args.adam_epsilon)
    # FiC: the fine-tuned teacher, encoded once (§4); with teacher.cache_outputs its logits from the same pass
    teacher_outputs = teacher_pass(TeacherPassSettings.from_config(cfg), setup, banks, stage.banks, args.device)
    callbacks = [schedule, evaluation, CrashPoints(), *tracking.callbacks(args.report_to, run_dir)]
    trainer = pruning_trainer(cfg, setup, args, banks, regularizer=regularizer, log_extras=schedule.log_values,
                              optimizers=(optimizer, None), callbacks=callbacks, teacher_outputs=teacher_outputs)
    evaluation.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.release()

    # fold the scores into hard zeros at the final level: a stock model, saved dense and compact (element) or
    # physically smaller (structured: the heads and neurons removed, cap.export)
    scores.set_level(p.final)
    if miss := sparsity_warning(cfg, scores.sparsity()["entries"], controller):
        warnings.warn(miss, stacklevel=1)
        notes.append(miss)
    unit_masks = scores.unit_masks() if p.granularity != "element" else None
    scores.fold()
    stage.save_result(model, setup.tokenizer, notes, unit_masks)
    tracking.log_models(tracked, run_dir)  # logger.log_model=true; the main process (the one W&B runs in)
    tracking.finish()
    return stage.rows()
