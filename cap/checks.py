"""Config checks that need neither data nor a model: `cap.recipes.run` calls `validate` before any recipe starts,
so a value that cannot work fails at once with its key, not after a teacher was fine-tuned or midway through training.

Types are the schema's (cap/config.py): Hydra refuses `trainer.lr=abc` while composing. What a type cannot say is
here: ranges, choices, fp16 needing CUDA, a global batch the launch's processes cannot split. The checks of one recipe's own keys stay in that recipe, at the top of its
`run`: `prune.sequence` and `prune.importance_fraction` in `cap_f`, the movement levels (`prune.final`,
`prune.target_sparsity`) in `movement`.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from cap import cli
from cap.data import get_task
from cap.distributed import batch_split, this_process
from cap.errors import UserError
from cap.models import POOLINGS
from cap.precision import PRECISIONS

LOGGERS = ("none", "wandb")
NORMALIZATIONS = ("original", "per_anchor")  # cap.contrastive.contrastive_loss


def validate(cfg: DictConfig) -> None:
    """UserError naming the first key whose value cannot work, and what to use instead."""
    cli.check(cfg)  # keys the schema lacks, values missing (the command line checked these while composing)
    get_task(cfg.task.name)
    _one_of(cfg, "trainer.precision", PRECISIONS)
    if cfg.trainer.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("trainer.precision=fp16 needs a CUDA GPU: use bf16 or fp32 on the CPU")
    _one_of(cfg, "logger.name", LOGGERS)
    for key in ("data.max_seq_length", "trainer.batch_size", "trainer.eval_batch_size"):
        _at_least(cfg, key, 1)
    batch_split(cfg.trainer.batch_size, cfg.trainer.device_batch_size, this_process().world)
    for key in ("ce.weight", "kd.weight", "contrast.unsup_weight", "contrast.sup_weight"):
        _at_least(cfg, key, 0)
    for key in ("kd.temperature", "contrast.temperature"):
        _at_least(cfg, key, 0, strict=True)
    _at_least(cfg, "contrast.extra_examples", 0, meaning="extra bank items drawn per step; 0 draws none")
    warmup = cfg.trainer.warmup
    if not (math.isfinite(warmup) and warmup >= 0 and (warmup < 1 or warmup == int(warmup))):
        raise UserError(f"trainer.warmup={warmup}: use a fraction of the updates in [0, 1) or a whole number of "
                        "updates")
    _one_of(cfg, "contrast.pooling", (*POOLINGS, "auto"))
    _one_of(cfg, "contrast.normalization", NORMALIZATIONS)


def _one_of(cfg: DictConfig, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise UserError(f"{key}={value}: use one of {', '.join(choices)}")


def _at_least(cfg: DictConfig, key: str, minimum: float, *, strict: bool = False, meaning: str = "") -> None:
    """`key` (a number, as its schema says) must be >= minimum (> minimum if `strict`) and finite."""
    value = OmegaConf.select(cfg, key)
    if math.isfinite(value) and (value > minimum or (value == minimum and not strict)):
        return
    kind = "an integer" if isinstance(value, int) else "a number"
    bound = f"> {minimum}" if strict else f">= {minimum}"
    raise UserError(f"{key}={value}: use {kind} {bound}" + (f" ({meaning})" if meaning else ""))
