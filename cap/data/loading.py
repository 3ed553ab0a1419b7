"""One entry point: a task's tokenised training features and eval splits, local or from the hub."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets

from cap.data.common import carve, subsample
from cap.data.glue import read_glue_split, tokenize_glue
from cap.data.squad import check_window, read_squad_split, tokenize_squad
from cap.data.tasks import DataError, TaskSpec, get_task


CARVED_SPLIT = "trainval"  # the eval split that data.validation_from_train carves from the training set


@dataclass
class TaskData:
    spec: TaskSpec
    train: datasets.Dataset                                   # tokenised training features, idx = 0..n-1
    evals: dict[str, datasets.Dataset] = field(default_factory=dict)  # split -> tokenised eval features
    eval_examples: dict[str, datasets.Dataset] = field(default_factory=dict)  # split -> raw examples


def eval_split_list(eval_splits, spec: TaskSpec) -> list[str]:
    """None -> the task's defaults; "a" or "a,b" -> ["a"] / ["a", "b"]; a list as it is (duplicates dropped)."""
    if eval_splits is None:
        names = list(spec.default_eval_splits)
    elif isinstance(eval_splits, str):
        names = [s.strip() for s in eval_splits.split(",") if s.strip()]
    else:
        names = [str(s).strip() for s in eval_splits]
    return list(dict.fromkeys(names))


def _check_count(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name}={value!r}: use a positive number of samples, or null for all of them")
    return value


def load_task_data(task: str, tokenizer, *, data_dir: str | Path | None = None, train_split: str = "train",
                   eval_splits=None, max_seq_length: int = 128, max_train_samples: int | None = None,
                   max_eval_samples: int | None = None, seed: int = 42, doc_stride: int = 128,
                   max_query_length: int = 64, cache_dir: str | Path | None = None,
                   validation_from_train: float | None = None) -> TaskData:
    """Read, subsample (seeded; before tokenising, so for SQuAD whole questions are drawn) and tokenise a task.

    data_dir None reads the hub; otherwise a local copy (glue/<TASK>/..., squad/...). Training features get
    idx = 0..n-1 (their position in the training set, after subsampling). `validation_from_train` (a fraction of
    the training rows, or a count) holds a seeded part of the training set out before anything is subsampled from
    it: the eval split `trainval`, for choosing settings without looking at the dev set."""
    spec = get_task(task)
    splits = eval_split_list(eval_splits, spec)
    max_train_samples = _check_count("data.max_train_samples", max_train_samples)
    max_eval_samples = _check_count("data.max_eval_samples", max_eval_samples)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 1_000_000 and max_seq_length > model_max:
        raise DataError(f"max_seq_length={max_seq_length} is longer than the model's {model_max} positions: "
                        f"set data.max_seq_length <= {model_max}")
    if spec.is_qa:
        check_window(tokenizer, max_seq_length, doc_stride, max_query_length)

    def read(split: str, option: str) -> datasets.Dataset:
        if spec.is_qa:
            return read_squad_split(data_dir, split, split_option=option)
        return read_glue_split(data_dir, spec.name, split, split_option=option)

    def tokenize(ds: datasets.Dataset, train: bool) -> datasets.Dataset:
        if spec.is_qa:
            return tokenize_squad(ds, tokenizer, train=train, max_seq_length=max_seq_length, doc_stride=doc_stride,
                                  max_query_length=max_query_length, cache_dir=cache_dir)
        return tokenize_glue(ds, tokenizer, spec, max_seq_length, cache_dir=cache_dir)

    # read every split before the (slow) tokenising, so that a missing split fails at once
    raw_train = read(train_split, "data.train_split")
    carved = None
    if validation_from_train is not None:
        raw_train, carved = carve(raw_train, validation_from_train, seed)
        print(f"eval split {CARVED_SPLIT}: {len(carved)} training rows held out (data.validation_from_train="
              f"{validation_from_train:g}, seed {seed}); the other {len(raw_train)} are the training pool")
    elif CARVED_SPLIT in splits:
        raise DataError(f"data.eval_split={CARVED_SPLIT} is carved from the training set: set "
                        "data.validation_from_train (e.g. 0.1 of the training rows)")
    raw_train = subsample(raw_train, max_train_samples, seed)
    raw_evals = {s: subsample(carved if s == CARVED_SPLIT else read(s, "data.eval_split"), max_eval_samples, seed)
                 for s in splits}
    train = tokenize(raw_train, train=True)
    evals = {s: tokenize(ds, train=False) for s, ds in raw_evals.items()}
    return TaskData(spec=spec, train=train, evals=evals, eval_examples=raw_evals)
