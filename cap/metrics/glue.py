"""GLUE metrics as an offline `evaluate.Metric`: one config per task, computed with numpy, scipy and scikit-learn.

Metric names follow the GLUE convention used by the hub's `glue` metric:

* cola: ``matthews_correlation``
* sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli: ``accuracy``
* mrpc, qqp: ``accuracy`` and ``f1`` (binary, positive class 1)
* stsb: ``pearson`` and ``spearmanr`` (float predictions and references)
"""
from __future__ import annotations

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}
GLUE_TASKS: tuple[str, ...] = tuple(GLUE_METRICS)

_DESCRIPTION = "GLUE task metrics (accuracy, binary F1, Matthews correlation, Pearson/Spearman correlation)."
_CITATION = """@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}"""
_INPUTS = """
Args:
    predictions: predicted label ids (float scores for stsb).
    references: gold label ids (float scores for stsb).
Returns: a dict of floats, keyed by the task's metric names (see `GLUE_METRICS`).
"""


def _accuracy(preds: np.ndarray, refs: np.ndarray) -> float:
    return float(np.mean(preds == refs)) if len(refs) else float("nan")


def glue_scores(task: str, predictions, references) -> dict[str, float]:
    """The task's GLUE metrics from array-likes of label ids (floats for stsb); plain Python floats."""
    if task not in GLUE_METRICS:
        raise ValueError(f"unknown GLUE task '{task}': use one of {', '.join(GLUE_TASKS)}")
    preds, refs = np.asarray(predictions), np.asarray(references)
    if preds.shape != refs.shape:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} differ in shape")
    if task == "stsb":
        preds, refs = preds.astype(np.float64), refs.astype(np.float64)
        return {"pearson": float(pearsonr(preds, refs)[0]), "spearmanr": float(spearmanr(preds, refs)[0])}
    preds, refs = preds.astype(np.int64), refs.astype(np.int64)
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
    if task in ("mrpc", "qqp"):
        return {"accuracy": _accuracy(preds, refs), "f1": float(f1_score(refs, preds, zero_division=0.0))}
    return {"accuracy": _accuracy(preds, refs)}


class Glue(evaluate.Metric):
    """`Glue(config_name=<task>)`; pass `keep_in_memory=True` to avoid writing arrow cache files."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in GLUE_METRICS:
            raise KeyError(f"unknown GLUE config '{self.config_name}': use one of {', '.join(GLUE_TASKS)}")
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            format=None,  # python lists: the numpy formatter of datasets would cast float64 to float32
            homepage="https://gluebenchmark.com/",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return glue_scores(self.config_name, predictions, references)
