"""Recipes: the end-to-end procedures (fine-tune; CAP-f, CAP-m, CAP-soft), one module each."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cap.errors import UserError


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    from cap.recipes import cap_f, finetune

    recipes = {"finetune": finetune.run, "cap_f": cap_f.run}
    if cfg.method.name not in recipes:
        raise UserError(f"unknown method '{cfg.method.name}': choose one of {', '.join(recipes)}")
    return recipes[cfg.method.name](cfg, Path(run_dir))
