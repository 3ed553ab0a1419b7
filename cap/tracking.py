"""Experiment tracking: W&B when `logger=wandb` (offline without an API key), nothing when `logger=none`.

The Trainer's own W&B callback logs the training curves and loss terms into the run started here; this module
adds the run's identity (project, group, tags, full config) and the evaluation rows.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def start(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Start tracking for this run; returns the Trainer's `report_to`."""
    if cfg.logger.name == "none":
        return []
    if cfg.logger.name != "wandb":
        from cap.errors import UserError

        raise UserError(f"unknown logger '{cfg.logger.name}': use logger=wandb or logger=none")
    if not _is_main_process():
        return []
    import wandb

    if not os.environ.get("WANDB_MODE") and not _has_wandb_key():
        os.environ["WANDB_MODE"] = "offline"
        print(f"W&B: no API key found, logging offline under {run_dir}/wandb (upload later with `wandb sync`)")
    wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
        tags=[str(t) for t in cfg.logger.tags] or None, dir=str(run_dir),
        name=f"{cfg.task.name}-{cfg.method.name}-{Path(run_dir).name}",
        config=OmegaConf.to_container(cfg, resolve=True), resume="allow",
        id=_run_id(run_dir),
    )
    return ["wandb"]


def _run_id(run_dir: Path) -> str:
    """One W&B run per run dir, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def log_summary(metrics: dict[str, float]) -> None:
    """Final metrics into the W&B run summary (no-op without an active run)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.run.summary.update(metrics)


def finish() -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
