"""Experiment tracking: W&B when `logger=wandb` (offline without an API key), nothing when `logger=none`; always
the run's own `trainer_log.jsonl` (`TrainingLog`: every logged record, the curves a study commits).

The Trainer's own W&B callback logs the training curves and loss terms into the run started here; this module
adds the run's identity (project, group, tags, full config) and the evaluation rows. Every run of one Hydra sweep
lands in one W&B group (the sweep dir's name) and carries tags computed from its config (`run_tags`), so a sweep's
runs can be filtered by task, method, sparsity, ablation and seed.
"""
from __future__ import annotations

import json
import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from cap.data.tasks import get_task
from cap.distributed import this_process
from cap.methods import nominal_sparsity


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


@dataclass(frozen=True)
class TrackingSettings:
    """What tracking needs of the config (`logger.*`), built once: where the W&B run goes, its group and tags (the
    user's first, then `run_tags`), its name's prefix, the whole config it records, and what a model artifact's
    metadata says (`logger.log_model`)."""
    wandb: bool = False
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str = ""
    config: dict = field(default_factory=dict)
    log_model: bool = False
    model_metadata: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrackingSettings:
        if cfg.logger.name != "wandb":  # logger=none (cap.checks refuses any other name)
            return cls()
        user_tags = [str(t) for t in cfg.logger.tags]
        return cls(wandb=True, project=cfg.logger.project, entity=cfg.logger.entity,
                   group=run_group(cfg, _hydra_config()),
                   tags=user_tags + [t for t in run_tags(cfg) if t not in user_tags],
                   name=f"{cfg.task.name}-{cfg.method.name}", config=OmegaConf.to_container(cfg, resolve=True),
                   log_model=bool(OmegaConf.select(cfg, "logger.log_model", default=False)),
                   model_metadata={"task": cfg.task.name, "method": cfg.method.name, "seed": cfg.seed,
                                   "sparsity": nominal_sparsity(cfg)})


def start(settings: TrackingSettings, run_dir: Path) -> list[str]:
    """Start tracking for this run; returns the Trainer's `report_to`."""
    if not settings.wandb or not this_process().main:
        return []
    import wandb

    if not os.environ.get("WANDB_MODE") and not has_wandb_key():
        os.environ["WANDB_MODE"] = "offline"
        print(f"W&B: no API key found, logging offline under {run_dir}/wandb (upload later with `wandb sync`)")
    wandb.init(
        project=settings.project, entity=settings.entity, group=settings.group, tags=settings.tags,
        dir=str(run_dir), name=f"{settings.name}-{Path(run_dir).name}", config=settings.config, resume="allow",
        id=_run_id(run_dir),
    )
    return ["wandb"]


class UpdateAxis(TrainerCallback):
    """W&B's x-axis for every metric: `train/update`, the updates of the whole run (CAPTrainer logs it), so CAP-f's
    stages, each a Trainer counting from 0, follow each other on one axis, each evaluation at its own update."""

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if wandb.run is not None:  # after the Trainer's W&B callback, which sets its own axis
            wandb.define_metric("train/update")
            wandb.define_metric("*", step_metric="train/update", step_sync=True)


class TrainingLog(TrainerCallback):
    """Every record the Trainer logs (the loss and each of its terms, λ, τ and sparsity, the gradient-balance figures,
    evaluations), one JSON line each in `path` (`trainer_log.jsonl` beside `metrics.json`), with `update`, the updates
    of the whole run. Written by the main process; a resumed Trainer drops the lines after the update it resumes
    from, so the file reads as an uninterrupted run's."""

    def __init__(self, path: Path, update_offset: int = 0):
        self.path, self.update_offset = Path(path), update_offset

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        reached = self.update_offset + state.global_step
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["update"] <= reached]
        if len(kept) < len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"update": self.update_offset + state.global_step, "epoch": state.epoch,
                      **{k: v for k, v in logs.items() if k != "update"}}
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


def callbacks(report_to: list[str], run_dir: Path, update_offset: int = 0) -> list[TrainerCallback]:
    """The Trainer callbacks tracking adds to a run's Trainers: the local training log, W&B's axis."""
    log = [TrainingLog(Path(run_dir) / "trainer_log.jsonl", update_offset)]
    return log + ([UpdateAxis()] if "wandb" in report_to else [])


def _hydra_config() -> DictConfig | None:
    """The `hydra` node of the running job; None outside `python -m cap` (tests, the compose API)."""
    return HydraConfig.get() if HydraConfig.initialized() else None


def run_group(cfg: DictConfig, hydra_cfg: DictConfig | None = None) -> str | None:
    """`logger.group` when given; else, in a multirun, the sweep dir's name (all runs of a sweep in one group)."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if hydra_cfg is not None and hydra_cfg.get("mode") == RunMode.MULTIRUN:
        return Path(str(hydra_cfg.sweep.dir)).name
    return None


# (key, value that switches a part of CAP off, label); the labels follow the paper's ablation names
_ABLATIONS = [
    ("prc", False, "-PrC"), ("snc", False, "-SnC"), ("fic", False, "-FiC"),
    ("sup_weight", 0, "-sup"), ("unsup_weight", 0, "-unsup"),
]


def _number(x: float) -> str:
    return f"{round(float(x), 4):g}"


def run_tags(cfg: DictConfig) -> list[str]:
    """W&B tags from the config: task:<name>, method:<name>, sparsity:<final target> (or tau:/lambda: for CAP-soft
    without a target), ablation:<label> (one tag per component switched off; `full` when none; none for finetune)
    and seed:<n>. Sparsity is the fraction pruned at the end: the last CAP-f step, 1 - the CAP-m keep fraction."""
    method, nominal = cfg.method.name, nominal_sparsity(cfg)
    tags = [f"task:{cfg.task.name}", f"method:{method}"]
    if nominal is not None:
        tags.append(f"sparsity:{_number(nominal)}")
    else:  # CAP-soft steered by λ alone: its sparsity is only known at the end (spec §5.3)
        tags += [f"tau:{_number(cfg.prune.final)}", f"lambda:{_number(cfg.prune.final_lambda)}"]
    if method != "finetune":
        tags += [f"ablation:{label}" for label in ablation_labels(cfg)]
    tags.append(f"seed:{cfg.seed}")
    return tags


def ablation_labels(cfg: DictConfig) -> list[str]:
    """What `cfg` switches off of CAP: ["full"], ["baseline"] (no contrastive term), or e.g. ["-PrC", "-KD"].
    A key missing from a config (an older run's) counts as the default."""
    def get(key, default):
        return OmegaConf.select(cfg, key, default=default)

    if not get("contrast.enabled", True):
        labels = ["baseline"]  # pruning with CE + KD only
    else:
        task = get_task(cfg.task.name)
        has_labels = not (task.is_qa or task.is_regression)  # the supervised term needs class ids (spec §6)
        labels = [label for key, off, label in _ABLATIONS
                  if get(f"contrast.{key}", not off) == off and (key != "sup_weight" or has_labels)]
        if get("contrast.pooling", "cls") != "cls":
            labels.append(f"pool={get('contrast.pooling', 'cls')}")
        if get("contrast.normalization", "original") != "original":
            labels.append(f"norm={get('contrast.normalization', 'original')}")
    if get("kd.weight", 0.9) == 0:
        labels.append("-KD")
    if get("prune.criterion", None) == "magnitude":  # the method's pruning replaced by magnitude Top-K
        labels.append("magnitude")
    return labels or ["full"]


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


def log_models(settings: TrackingSettings, run_dir: Path) -> list[str]:
    """With `logger.log_model=true`, the run's saved models (`model/`, `export/`, `sparse/`, each with its model card)
    as W&B artifacts of type `model`; returns their names (none without an active run)."""
    if not (settings.wandb and settings.log_model):
        return []
    import wandb

    if wandb.run is None:
        return []
    names = []
    for folder in (Path(run_dir) / name for name in ("model", "export", "sparse")):
        if folder.is_dir():
            artifact = wandb.Artifact(f"{wandb.run.id}-{folder.name}", type="model",
                                      metadata={**settings.model_metadata, "folder": folder.name})
            artifact.add_dir(str(folder))
            wandb.log_artifact(artifact)
            names.append(artifact.name)
    return names


def finish() -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
