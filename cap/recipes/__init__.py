"""Recipes: the end-to-end procedures (fine-tune; CAP-f, CAP-m, CAP-soft), one module each."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cap.checks import validate
from cap.data import get_task
from cap.distributed import batch_split, describe_batch, join, this_process
from cap.errors import UserError
from cap.methods import RECIPES, ROW_FIELDS
from cap.models import check_prunable, resolve_pooling
from cap.precision import resolve_config
from cap.stages import keep_started_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    """Run the recipe of `cfg.method.name` in `run_dir`; returns the metrics.json rows and prints where they are.

    The config, and whether the model has what the method prunes, are checked first: before a recipe fine-tunes a
    missing teacher or writes anything."""
    if cfg.method.name not in RECIPES:
        raise UserError(f"unknown method '{cfg.method.name}': choose one of {', '.join(RECIPES)}")
    validate(cfg)
    join()  # under a launcher: the processes agree on what is written, and by whom, before anything is (cap.distributed)
    log_batch(cfg)
    check_prunable(cfg.model.name_or_path, get_task(cfg.task.name), cfg.method.name)
    if cfg.contrast.pooling == "auto":
        cfg.contrast.pooling = resolve_pooling("auto", cfg.model.name_or_path)
        print(f"contrast.pooling=auto: {cfg.contrast.pooling} (the checkpoint's own sentence representation)")
    resolve_config(cfg)
    record_precision(Path(run_dir), cfg.trainer.precision)
    keep_started_config(Path(run_dir))
    recipe = importlib.import_module(f"cap.recipes.{RECIPES[cfg.method.name]}")
    rows = recipe.run(cfg, Path(run_dir))
    if this_process().main:
        print(summary(run_dir, rows, cfg.method.name))
    return rows


def log_batch(cfg: DictConfig) -> None:
    """Log how the global batch is made (processes x per-device batch x accumulation); also printed where it is more
    than one process's single batch."""
    world = this_process().world
    device_batch, accumulation = batch_split(cfg.trainer.batch_size, cfg.trainer.device_batch_size, world)
    message = describe_batch(cfg.trainer.batch_size, device_batch, accumulation, world)
    log.info(message)
    if this_process().main and device_batch != cfg.trainer.batch_size:
        print(message)


def record_precision(run_dir: Path, precision: str) -> None:
    """Write the precision the run uses into its saved config (`.hydra/config.yaml`, where Hydra wrote `auto`), so
    that the run says what it computed in and `cap.evaluate` scores it the same way."""
    path = run_dir / ".hydra" / "config.yaml"
    if not this_process().main or not path.is_file():
        return
    saved = OmegaConf.load(path)
    if OmegaConf.select(saved, "trainer.precision") not in (None, precision):
        OmegaConf.update(saved, "trainer.precision", precision, merge=False)
        OmegaConf.save(saved, path)


def summary(run_dir: Path, rows: list[dict], method: str) -> str:
    """`run dir: ...` and the final metrics rows, one line each (CAP-f: every stage, one per sparsity; the others:
    the last stage), with the warnings recorded on them."""
    final = rows
    if rows and method != "cap_f":
        final = [r for r in rows if r.get("stage") == rows[-1].get("stage")]
    lines = [f"run dir: {run_dir}"]
    for row in final:
        values = " ".join(f"{k}={v:.4f}" for k, v in row.items()
                          if k not in ROW_FIELDS and not k.startswith("sparsity_") and isinstance(v, float))
        lines.append(f"  {row.get('split')} (stage {row.get('stage')}, sparsity {row.get('sparsity', 0):.4f}): "
                     f"{values}")
        lines += [f"  warning: {w}" for w in row.get("warnings", []) if f"  warning: {w}" not in lines]
    if not final:
        lines.append("  no metrics rows")
    return "\n".join(lines)
