"""What each method means, for every part of `cap` that needs it: the recipe that runs it, the fraction of weights it
aims to prune, the fields of its metrics rows, the TrainingArguments of its Trainers. It sits low in the house:
recipes, tracking, report and evaluate read it; it imports none of them."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments

from cap.distributed import batch_split, this_process
from cap.precision import resolve_config

RECIPES = {"finetune": "finetune", "cap_f": "cap_f", "cap_m": "movement", "cap_soft": "movement"}  # cap/recipes/
# metrics.json fields that describe a row rather than measure the model
ROW_FIELDS = ("stage", "method", "step", "split", "sparsity", "warnings")


def nominal_sparsity(cfg: DictConfig) -> float | None:
    """The fraction of weights a config aims to prune, or None when it names none: 0 for fine-tuning, CAP-f's last
    step of `prune.sequence` (its heads and FFN neurons; each stage aims at its own step), CAP-m's 1 - prune.final
    (the Top-K keep fraction), CAP-soft's prune.target_sparsity (None without one: it lands where λ takes it)."""
    method = cfg.method.name
    if method == "finetune":
        return 0.0
    if method == "cap_f":
        return float(cfg.prune.sequence[-1])
    if method == "cap_m":
        return round(1 - float(cfg.prune.final), 6)
    if method == "cap_soft":
        target = OmegaConf.select(cfg, "prune.target_sparsity")
        return None if target is None else float(target)
    return None


def training_arguments(cfg: DictConfig, output_dir: Path, report_to: list[str]) -> TrainingArguments:
    resolve_config(cfg)  # trainer.precision=auto, where no recipe resolved it yet (cap.evaluate)
    t = cfg.trainer
    save = {"save_strategy": "epoch"} if t.save_steps is None else {"save_strategy": "steps", "save_steps": t.save_steps}
    # trainer.batch_size is the global batch: the same updates on any number of processes
    device_batch, accumulation = batch_split(t.batch_size, t.device_batch_size, this_process().world)
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=device_batch,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup,
        max_grad_norm=t.max_grad_norm,
        adam_epsilon=1e-8,
        lr_scheduler_type="linear",
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        logging_steps=t.logging_steps,
        save_total_limit=t.save_total_limit,
        seed=cfg.seed,
        # CAPTrainer gives the length-grouped sampler its lengths and a seed per epoch (cap.trainer)
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        dataloader_num_workers=t.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also what makes Accelerate set up gloo DDP and CPU bf16
        remove_unused_columns=False,  # keeps `idx`, which CAP's banks are indexed by
        report_to=report_to,
        disable_tqdm=False,
        **save,
    )


def metric_rows(results: dict[str, dict[str, float]], **fields) -> list[dict]:
    """One metrics.json row per eval split: the split is always recorded (offline MNLI/QQP use `heldout`)."""
    return [{**fields, "split": split, **metrics} for split, metrics in results.items()]
