"""Offline GLUE and SQuAD metrics: `load_metric(task).compute(predictions=..., references=...)`.

The metric modules are instantiated directly from this package (no `evaluate.load`, no hub, no module cache), and by
default keep their predictions in memory, so nothing is written under the evaluate cache apart from an empty folder.
"""
from __future__ import annotations

import evaluate

from cap.metrics.glue import GLUE_METRICS, GLUE_TASKS, Glue, glue_scores
from cap.metrics.squad import Squad, normalize_answer, squad_scores

__all__ = [
    "KNOWN_TASKS", "GLUE_TASKS", "Glue", "Squad", "load_metric", "metric_names", "main_metric", "compute_glue",
    "glue_scores", "squad_scores", "normalize_answer",
]

_METRICS: dict[str, tuple[str, ...]] = {**GLUE_METRICS, "squad": ("exact_match", "f1")}
KNOWN_TASKS: tuple[str, ...] = tuple(_METRICS)
_MAIN = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "accuracy", "squad": "f1"}


def _squash(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


_ALIASES = {_squash(name): name for name in KNOWN_TASKS}


def canonical_task(task: str) -> str:
    """The metric config for `task`; case, '-' and '_' are ignored ("SST-2" -> "sst2"). Unknown -> ValueError."""
    key = str(task).strip().lower()
    if key in _METRICS:
        return key
    if _squash(key) in _ALIASES:
        return _ALIASES[_squash(key)]
    raise ValueError(f"unknown task '{task}' for metrics: use one of {', '.join(KNOWN_TASKS)}")


def load_metric(task: str, **kwargs) -> evaluate.EvaluationModule:
    """The evaluate module for `task` (GLUE config or "squad"), built offline; kwargs go to `evaluate.Metric`.

    For mnli this is the plain "mnli" accuracy module; evaluate matched and mismatched splits separately.
    """
    name = canonical_task(task)
    kwargs.setdefault("keep_in_memory", kwargs.get("num_process", 1) == 1)
    if name == "squad":
        return Squad(**kwargs)
    return Glue(config_name=name, **kwargs)


def metric_names(task: str) -> list[str]:
    """Keys of the dict that `load_metric(task).compute(...)` returns."""
    return list(_METRICS[canonical_task(task)])


def main_metric(task: str) -> str:
    """The headline metric: cola matthews_correlation, stsb pearson, mrpc f1, qqp accuracy, squad f1, else accuracy."""
    return _MAIN.get(canonical_task(task), "accuracy")


def compute_glue(task: str, predictions, references) -> dict[str, float]:
    """GLUE metrics from label ids (floats for stsb) through the evaluate module; returns plain floats."""
    name = canonical_task(task)
    if name == "squad":
        raise ValueError("compute_glue is for GLUE tasks; use load_metric('squad').compute(...) for SQuAD")
    return {k: float(v) for k, v in load_metric(name).compute(predictions=predictions, references=references).items()}
