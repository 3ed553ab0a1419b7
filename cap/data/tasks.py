"""The ten tasks: where their data lives (local GLUE folder, hub dataset) and what their labels are."""
from __future__ import annotations

from dataclasses import dataclass

from cap.errors import UserError


class DataError(UserError, ValueError):
    """Missing or malformed data, or a bad data option: the message says what is wrong and what to do."""


@dataclass(frozen=True)
class TaskSpec:
    name: str                               # our name: cola, sst2, ..., squad (also the hub config for GLUE)
    glue_dir: str | None                    # folder under <data_dir>/glue/ ("SST-2"); None for squad
    hub_path: str                           # "nyu-mll/glue" or "rajpurkar/squad"
    hub_config: str | None                  # "sst2", ...; None for squad
    text_columns: tuple[str, ...]           # hub column names of the input text(s), in model order
    num_labels: int                         # 1 for regression (stsb); 2 for QA (start/end logits)
    label_names: tuple[str, ...]            # in the hub's ClassLabel order; () for stsb and squad
    is_regression: bool = False
    is_qa: bool = False
    default_eval_splits: tuple[str, ...] = ("validation",)


def _glue(name, glue_dir, text_columns, label_names, **kw) -> TaskSpec:
    return TaskSpec(name=name, glue_dir=glue_dir, hub_path="nyu-mll/glue", hub_config=name,
                    text_columns=tuple(text_columns), num_labels=kw.pop("num_labels", len(label_names)),
                    label_names=tuple(label_names), **kw)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable")),
        _glue("sst2", "SST-2", ("sentence",), ("negative", "positive")),
        _glue("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
        _glue("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate")),
        _glue("stsb", "STS-B", ("sentence1", "sentence2"), (), num_labels=1, is_regression=True),
        _glue("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
              default_eval_splits=("validation_matched", "validation_mismatched")),
        _glue("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment")),
        _glue("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        _glue("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
        TaskSpec(name="squad", glue_dir=None, hub_path="rajpurkar/squad", hub_config=None,
                 text_columns=("question", "context"), num_labels=2, label_names=(), is_qa=True),
    )
}


def get_task(name: str) -> TaskSpec:
    key = str(name).strip().lower().replace("-", "").replace("_", "")  # also accepts GLUE's "SST-2", "STS-B"
    if key not in TASKS:
        raise DataError(f"unknown task '{name}': use one of {', '.join(TASKS)} (task=<name>)")
    return TASKS[key]
