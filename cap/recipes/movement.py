"""CAP-m and CAP-soft (spec §4 CAP-m/soft, §5.2-5.4): movement pruning with PrC/SnC/FiC banks, one training run.

Scores S on the 72 encoder matrices learn with their own optimizer group; the level (Top-K keep fraction for
CAP-m, sigmoid threshold for CAP-soft) follows the cubic schedule, set before every update. At the start of
epoch 0 the (dense) model is encoded into PrC, at the start of every later epoch appended to SnC. Every epoch is
evaluated at the final level. Epoch checkpoints hold weights, scores, optimizer and schedule position; banks are
saved beside them, so a killed run resumes."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from cap import tracking
from cap.banks import build_banks, encode_into, load_banks, load_or_encode, save_banks
from cap.errors import UserError
from cap.evaluation import evaluate_task
from cap.io import append_metrics, last_complete_checkpoint, publish_dir, read_json
from cap.pruning.movement import LambdaController, MovementScores, lambda_schedule, threshold_schedule
from cap.recipes.common import (contrast_settings, ensure_teacher, loss_weights, metric_rows, prepare,
                                process_rank, training_arguments)
from cap.sparse import save_sparse
from cap.trainer import CAPTrainer


def check_levels(p) -> None:
    if p.criterion == "topk" and not (0 < p.final <= p.initial <= 1):
        raise UserError(f"prune.final={p.final}: the Top-K keep fraction must satisfy 0 < final <= initial "
                        f"({p.initial}) <= 1 (0.1 keeps 10 %, i.e. 90 % sparsity)")
    if p.criterion == "soft" and not (0 <= p.initial <= p.final < 1):
        raise UserError(f"prune.final={p.final}: the soft threshold must satisfy 0 <= initial <= final < 1")
    if p.criterion not in ("topk", "soft"):
        raise UserError(f"prune.criterion={p.criterion}: use topk (CAP-m) or soft (CAP-soft)")
    if p.target_sparsity is not None and (p.criterion != "soft" or not 0 < p.target_sparsity < 1):
        raise UserError("prune.target_sparsity needs prune.criterion=soft (CAP-soft) and a value in (0, 1)")


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
                progress = (level - p.initial) / (p.final - p.initial) if p.final > p.initial else 1.0
                self.lam = self.controller.update(self.scores.sparsity()["entries"], progress)
            else:
                self.lam = lambda_schedule(level, final_lambda=p.final_lambda, final=p.final)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs.update(prune_level=self.scores.level, prune_lambda=self.lam,
                        sparsity_entries=self.scores.sparsity()["entries"])

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if not self.banks:
            return
        epoch = round(state.epoch or 0)
        self.scores.set_level(self.level(max(state.global_step - 1, 0)))  # the last level used in training
        name = "prc" if epoch == 0 else "snc"
        if (self.bank_dir / "prc.safetensors").exists() or (self.bank_dir / "snc.safetensors").exists():
            load_banks({k: b for k, b in self.banks.items() if (self.bank_dir / f"{k}.safetensors").exists()},
                       self.bank_dir)
        if name not in self.banks:
            return
        bank = self.banks[name]
        bank.n_reps = min(bank.n_reps, 0 if epoch == 0 else epoch - 1)  # a resumed epoch re-encodes its snapshot
        encode_into(bank, model, self.data.train, self.collator, pooling=self.cfg.contrast.pooling,
                    batch_size=self.cfg.trainer.eval_batch_size, precision=self.cfg.trainer.precision,
                    train_mode=epoch > 0 and self.cfg.bank.snapshot_train_mode, desc=f"{name} bank")
        if process_rank() == 0:
            save_banks({name: bank}, self.bank_dir)


class EpochEvaluation(TrainerCallback):
    """Evaluates at the final level after every epoch: one metrics.json row per split, with the sparsity."""

    def __init__(self, cfg, scores, data, run_dir, method):
        self.cfg, self.scores, self.data, self.run_dir, self.method = cfg, scores, data, run_dir, method
        self.trainer = None

    def on_epoch_end(self, args, state, control, **kwargs):
        training_level = self.scores.level
        self.scores.set_level(self.cfg.prune.final)
        results = evaluate_task(self.trainer, self.data, out_dir=self.run_dir)
        sparsity = self.scores.sparsity()
        rows = metric_rows(results, stage=round(state.epoch), method=self.method, step=state.global_step,
                           sparsity=round(sparsity["entries"], 6),
                           **{f"sparsity_{k}": round(v, 6) for k, v in sparsity.items()})
        self.scores.set_level(training_level)
        if process_rank() == 0:
            done = {(r["stage"], r["split"]) for r in read_json(self.run_dir / "metrics.json", [])}
            append_metrics(self.run_dir, [r for r in rows if (r["stage"], r["split"]) not in done])
        self.trainer.log({f"{r['split']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, float)})


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    p = cfg.prune
    check_levels(p)
    model_dir = run_dir / "model"
    if cfg.trainer.resume and (model_dir / "config.json").exists() and (run_dir / "sparse").exists():
        print(f"{run_dir} already holds a finished run (trainer.resume=false starts over)")
        return read_json(run_dir / "metrics.json", [])
    setup = prepare(cfg, teacher_path=ensure_teacher(cfg))
    model, data = setup.model, setup.data
    scores = MovementScores.attach(model, p.criterion)
    labels = None if data.spec.is_qa or data.spec.is_regression else torch.tensor(data.train["labels"])
    banks = build_banks(cfg, len(data.train), model.config.hidden_size, labels, max(cfg.trainer.epochs - 1, 0))
    report_to = tracking.start(cfg, run_dir)
    args = training_arguments(cfg, run_dir / "checkpoints", report_to)
    steps_per_epoch = math.ceil(len(data.train) / (args.per_device_train_batch_size * args.world_size
                                                   * args.gradient_accumulation_steps))
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * math.ceil(args.num_train_epochs)
    warmup_steps = int(cfg.trainer.warmup * total_steps) if cfg.trainer.warmup < 1 else int(cfg.trainer.warmup)
    controller = None
    if p.target_sparsity is not None:
        controller = LambdaController(target=p.target_sparsity, initial_lambda=p.final_lambda)
    schedule = MovementSchedule(cfg, scores, banks, run_dir / "banks", data, setup.collator, total_steps,
                                warmup_steps, controller)
    evaluation = EpochEvaluation(cfg, scores, data, run_dir, cfg.method.name)
    regularizer = (lambda: schedule.lam * scores.regularization()) if p.criterion == "soft" else None
    score_ids = {id(s) for s in scores.score_parameters()}
    weights = [w for w in model.parameters() if id(w) not in score_ids and w.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": weights, "lr": args.learning_rate, "weight_decay": args.weight_decay},
        {"params": scores.score_parameters(), "lr": p.score_lr, "weight_decay": 0.0},
    ], eps=args.adam_epsilon)
    trainer = CAPTrainer(model=model, args=args, train_dataset=data.train, data_collator=setup.collator,
                         processing_class=setup.tokenizer, weights=loss_weights(cfg), teacher=setup.teacher,
                         banks=banks, contrast=contrast_settings(cfg), regularizer=regularizer,
                         draw_seed=cfg.seed + 1000 * process_rank(),
                         optimizers=(optimizer, None), callbacks=[schedule, evaluation])
    evaluation.trainer = trainer
    load_or_encode("fic", banks, run_dir / "banks", trainer.teacher, data.train, setup.collator,
                   pooling=cfg.contrast.pooling, batch_size=cfg.trainer.eval_batch_size, precision=cfg.trainer.precision)
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(run_dir / "checkpoints")
                  if cfg.trainer.resume else None)
    trainer.release()

    # fold the scores into hard zeros at the final level: a stock model, saved dense and compact
    scores.set_level(p.final)
    scores.fold()
    if process_rank() == 0:
        tmp = run_dir / "model.tmp"
        model.save_pretrained(tmp)
        setup.tokenizer.save_pretrained(tmp)
        publish_dir(tmp, model_dir)
        save_sparse(model, run_dir / "sparse.tmp", tokenizer=setup.tokenizer)
        publish_dir(run_dir / "sparse.tmp", run_dir / "sparse")
    tracking.finish()
    return read_json(run_dir / "metrics.json", [])
