"""Recipes: the end-to-end procedures (fine-tune; CAP-f, CAP-m, CAP-soft), one module each."""
from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from cap.checks import validate
from cap.data import get_task
from cap.errors import UserError
from cap.models import check_prunable

RECIPES = {"finetune": "finetune", "cap_f": "cap_f", "cap_m": "movement", "cap_soft": "movement"}


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    """Run the recipe of `cfg.method.name` in `run_dir`; returns the metrics.json rows.

    The config, and whether the model has what the method prunes, are checked first: before a recipe fine-tunes a
    missing teacher or writes anything."""
    if cfg.method.name not in RECIPES:
        raise UserError(f"unknown method '{cfg.method.name}': choose one of {', '.join(RECIPES)}")
    validate(cfg)
    check_prunable(cfg.model.name_or_path, get_task(cfg.task.name), cfg.method.name)
    recipe = importlib.import_module(f"cap.recipes.{RECIPES[cfg.method.name]}")
    return recipe.run(cfg, Path(run_dir))
