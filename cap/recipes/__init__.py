"""Recipes: the end-to-end procedures (fine-tune; CAP-f, CAP-m, CAP-soft), one module each."""
from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

from cap.errors import UserError

RECIPES = {"finetune": "finetune", "cap_f": "cap_f", "cap_m": "movement", "cap_soft": "movement"}


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    """Run the recipe of `cfg.method.name` in `run_dir`; returns the metrics.json rows."""
    if cfg.method.name not in RECIPES:
        raise UserError(f"unknown method '{cfg.method.name}': choose one of {', '.join(RECIPES)}")
    recipe = importlib.import_module(f"cap.recipes.{RECIPES[cfg.method.name]}")
    return recipe.run(cfg, Path(run_dir))
