"""Config checks that need neither data nor a model: `cap.recipes.run` calls `validate` before any recipe starts,
so a value that cannot work fails at once with its key, not after a teacher was fine-tuned or midway through training.

Types are the schema's (cap/config.py): Hydra refuses `trainer.lr=abc` while composing. What a type cannot say is
here: ranges, choices, fp16 needing CUDA, a global batch the launch's processes cannot split, and each method's own
keys: CAP-f's `prune.sequence` and `prune.importance_fraction`; CAP-m's and CAP-soft's levels (`prune.final`,
`prune.target_sparsity`, ...) and whether the cubic schedule fits the run's updates (SQuAD's once tokenised: the
recipe asks `check_schedule` again then). One pass, before anything runs.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from cap import cli
from cap.banks import BANK_DTYPES
from cap.data import get_task, read_glue_split
from cap.distributed import batch_split, this_process
from cap.errors import UserError
from cap.methods import RECIPES
from cap.models import POOLINGS
from cap.precision import PRECISIONS
from cap.pruning.granularity import GRANULARITIES
from cap.pruning.movement import CRITERIA, schedule_phases

LOGGERS = ("none", "wandb")
NORMALIZATIONS = ("original", "per_anchor")  # cap.contrastive.contrastive_loss
REACHES = ("both", "weights", "scores")  # cap.losses.withheld_gradient


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
    _one_of(cfg, "bank.dtype", BANK_DTYPES)
    _one_of(cfg, "contrast.pooling", (*POOLINGS, "auto"))
    _one_of(cfg, "contrast.normalization", NORMALIZATIONS)
    _one_of(cfg, "contrast.reaches", REACHES)
    recipe = RECIPES.get(cfg.method.name)
    if cfg.contrast.reaches != "both" and recipe != "movement":
        raise UserError(f"contrast.reaches={cfg.contrast.reaches} splits weights from movement scores: use it with "
                        "method=cap_m or cap_soft (this method has no scores)")
    if cfg.contrast.reaches != "both" and this_process().world > 1:
        raise UserError(f"contrast.reaches={cfg.contrast.reaches} is a single-process ablation: run it without "
                        "accelerate/torchrun")
    if recipe == "cap_f":
        check_sequence(cfg.prune.sequence)
        if not 0 < cfg.prune.importance_fraction <= 1:
            raise UserError(f"prune.importance_fraction={cfg.prune.importance_fraction}: use a value in (0, 1]")
    elif recipe == "movement":
        check_levels(cfg.prune)
        planned = planned_updates(cfg, None) or planned_updates(cfg, training_rows(cfg))
        if planned:  # SQuAD's windows are counted once tokenised: the recipe checks it then
            check_schedule(cfg, *planned)


# CAP-f's keys

def check_sequence(sequence) -> list[float]:
    seq = [float(p) for p in sequence]
    if not seq or any(not 0 < p < 1 for p in seq) or any(b <= a for a, b in zip(seq, seq[1:])):
        raise UserError(f"prune.sequence={seq}: use increasing sparsities strictly between 0 and 1, "
                        "e.g. prune.sequence=[0.1,0.2,0.3]")
    return seq


# CAP-m's and CAP-soft's keys

SHORT_RAMP = 0.1         # a ramp over fewer of the updates is warned about (the paper's QQP schedule ramps over 52 %)


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
    if p.granularity not in GRANULARITIES or (p.granularity != "element" and p.criterion == "magnitude"):
        raise UserError(f"prune.granularity={p.granularity}: use element (one score per weight) or structured (one "
                        "per attention head and FFN neuron; with prune.criterion=topk or soft)")


def planned_updates(cfg: DictConfig, n_train: int | None) -> tuple[int, int] | None:
    """(T, W): the optimizer updates the Trainer runs on `n_train` training features (in updates of the global
    batch: the same on any number of processes), and the schedule's W (trainer.warmup: a fraction of T when < 1,
    else a number of updates); None when T depends on an unknown `n_train`."""
    t = cfg.trainer
    if t.max_steps > 0:
        total = t.max_steps
    elif n_train is None:
        return None
    else:
        total = math.ceil(n_train / t.batch_size) * math.ceil(t.epochs)
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
