"""GLUE: read a split (local GLUE TSV / hub-schema JSONL, or the hub) into the hub's columns; tokenise it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import datasets

from cap.data.common import (
    HUB_TO_LOCAL, check_data_dir, cached_map, find_file, load_from_hub, present_splits, read_jsonl, read_text,
    split_lines, suggest_split, tokenizer_fingerprint, with_position_idx,
)
from cap.data.tasks import DataError, TaskSpec, get_task

TSV_SUFFIXES = (".tsv", ".tsv.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's columns are in GLUE's TSV files."""
    columns: dict[str, str]          # hub text column -> TSV column name
    label: str                       # TSV label column name
    label_kind: str                  # "int": ids as digits; "name": label names; "float": a score
    header: tuple[str, ...] | None = None  # the column names of a file without a header row (CoLA)


TSV_LAYOUTS: dict[str, TsvLayout] = {
    "cola": TsvLayout({"sentence": "sentence"}, "label", "int", header=("source", "label", "original", "sentence")),
    "sst2": TsvLayout({"sentence": "sentence"}, "label", "int"),
    "mrpc": TsvLayout({"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality", "int"),
    "qqp": TsvLayout({"question1": "question1", "question2": "question2"}, "is_duplicate", "int"),
    "stsb": TsvLayout({"sentence1": "sentence1", "sentence2": "sentence2"}, "score", "float"),
    "mnli": TsvLayout({"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label", "name"),
    "qnli": TsvLayout({"question": "question", "sentence": "sentence"}, "label", "name"),
    "rte": TsvLayout({"sentence1": "sentence1", "sentence2": "sentence2"}, "label", "name"),
    "wnli": TsvLayout({"sentence1": "sentence1", "sentence2": "sentence2"}, "label", "int"),
}

STSB_RANGE = (0.0, 5.0)
NO_LABEL = -1  # the hub's label of a test row


def glue_features(spec: TaskSpec) -> datasets.Features:
    """The hub's features: text columns, label (ClassLabel, or float32 for stsb), idx (int32)."""
    feats = {col: datasets.Value("string") for col in spec.text_columns}
    if spec.is_regression:
        feats["label"] = datasets.Value("float32")
    else:
        feats["label"] = datasets.ClassLabel(names=list(spec.label_names))
    feats["idx"] = datasets.Value("int32")
    return datasets.Features(feats)


def _parse_label(spec: TaskSpec, kind: str, value, where: str):
    """The hub label for one raw label value; DataError naming `where` (file, line) if it is not in the task's set."""
    if spec.is_regression:
        try:
            if isinstance(value, bool):
                raise ValueError
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not (STSB_RANGE[0] <= score <= STSB_RANGE[1]):
            raise DataError(f"{where}: label {value!r} is not a similarity score in [0, 5] for task {spec.name}")
        return score
    if kind == "name" and isinstance(value, str) and value.strip() in spec.label_names:
        return spec.label_names.index(value.strip())
    if kind == "int":
        number = int(value.strip()) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else value
        if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < spec.num_labels:
            return number
    allowed = ", ".join(spec.label_names) if kind == "name" else ", ".join(
        f"{i} ({n})" for i, n in enumerate(spec.label_names))
    raise DataError(f"{where}: label {value!r} is not one of the labels of task {spec.name}: {allowed}")


def _read_tsv(path: Path, spec: TaskSpec) -> dict[str, list]:
    layout = TSV_LAYOUTS[spec.name]
    lines = split_lines(read_text(path))
    test_file = path.name.startswith("test")  # GLUE's test files have a header (CoLA's too) and no labels
    if layout.header is None or (test_file and lines[0].startswith("index\t")):
        header = [h.strip() for h in lines[0].split("\t")]
        first = 1
    else:
        header, first = list(layout.header), 0
    unlabelled = test_file and layout.label not in header
    wanted = [*layout.columns.values(), *([] if unlabelled else [layout.label])]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(
            f"{path}, line 1: the header has no column {', '.join(repr(m) for m in missing)} "
            f"(found {', '.join(header)}); task {spec.name} expects GLUE's TSV layout with {', '.join(wanted)}"
        )
    if len(lines) <= first:
        raise DataError(f"{path} has a header but no rows; replace it with a good copy of the split")
    positions = {col: header.index(name) for col, name in layout.columns.items()}
    label_pos = None if unlabelled else header.index(layout.label)
    out = {col: [] for col in spec.text_columns}
    labels = []
    for lineno in range(first + 1, len(lines) + 1):
        fields = lines[lineno - 1].split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path}, line {lineno}: {len(fields)} tab-separated columns, expected {len(header)} "
                f"({', '.join(header)}); fix or remove that line"
            )
        for col, pos in positions.items():
            out[col].append(fields[pos])
        labels.append(NO_LABEL if unlabelled else
                      _parse_label(spec, layout.label_kind, fields[label_pos], f"{path}, line {lineno}"))
    out["label"] = labels
    return out


def _read_jsonl(path: Path, spec: TaskSpec) -> dict[str, list]:
    out = {col: [] for col in spec.text_columns}
    labels = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}, line {lineno}"
        for col in (*spec.text_columns, "label"):
            if col not in obj:
                raise DataError(
                    f"{where}: no '{col}' field; task {spec.name} expects JSON lines with the hub's columns "
                    f"{', '.join((*spec.text_columns, 'label'))}"
                )
        for col in spec.text_columns:
            if not isinstance(obj[col], str):
                raise DataError(f"{where}: '{col}' is {type(obj[col]).__name__}, expected a string")
            out[col].append(obj[col])
        value = obj["label"]
        kind = "name" if isinstance(value, str) and not value.strip().lstrip("-").isdigit() else "int"
        labels.append(_parse_label(spec, kind, value, where))
    out["label"] = labels
    return out


def local_split_stems(split: str) -> list[str]:
    stems = [HUB_TO_LOCAL.get(split, split)]
    return stems if stems[0] == split else [*stems, split]


def read_glue_split(data_dir: str | Path | None, task: str, split: str, *,
                    split_option: str = "data.eval_split") -> datasets.Dataset:
    """One split of a GLUE task with exactly the hub's columns: text columns, `label` (int; float for stsb) and
    `idx` (the row's position in the split).

    data_dir None reads `nyu-mll/glue` from the hub. Otherwise `<data_dir>/glue/<TASK>/<split>.tsv[.gz]` (GLUE's
    original TSV layout) or `<split>.jsonl[.gz]` (the hub's columns); hub split names map to local files
    (validation -> dev, validation_matched -> dev_matched, ...), local names (dev, heldout, ...) work as they are.
    `split_option` is the config key named in the hint when the split is missing."""
    spec = get_task(task)
    if spec.is_qa:
        raise DataError(f"task {spec.name} is not a GLUE task; use read_squad_split")
    if data_dir is None:
        return load_from_hub(spec.hub_path, spec.hub_config, split)
    folder = check_data_dir(data_dir) / "glue" / spec.glue_dir
    if not folder.is_dir():
        raise DataError(
            f"no folder {folder} for task {spec.name}: put GLUE's {spec.glue_dir} files there "
            f"(<split>.tsv[.gz] or <split>.jsonl[.gz]) or point data.dir / CAP_DATA_DIR at a copy that has them"
        )
    stems = local_split_stems(split)
    path = find_file(folder, stems, (*TSV_SUFFIXES, *JSONL_SUFFIXES))
    if path is None:
        present = present_splits(folder, (*TSV_SUFFIXES, *JSONL_SUFFIXES))
        hint = suggest_split(present, split_option)
        raise DataError(
            f"task {spec.name} has no split '{split}' in {folder} (looked for {stems[0]}.tsv[.gz] / "
            f"{stems[0]}.jsonl[.gz]); splits present: {', '.join(present) or 'none'}"
            + (f"; use {hint}" if hint else "")
        )
    columns = _read_tsv(path, spec) if path.name.endswith(TSV_SUFFIXES) else _read_jsonl(path, spec)
    columns["idx"] = list(range(len(columns["label"])))
    ds = datasets.Dataset.from_dict(columns, features=glue_features(spec), split=split)
    return ds


def tokenize_glue(ds: datasets.Dataset, tokenizer, spec: TaskSpec, max_seq_length: int,
                  cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Model features: input_ids, attention_mask, token_type_ids (when the tokenizer makes them), labels, idx.

    Text is truncated to max_seq_length (longest-first for pairs) and not padded (the collator pads). The result
    is cached under cache_dir (default: the datasets cache) keyed by the data's content, tokenizer and length."""
    for col in (*spec.text_columns, "label"):
        if col not in ds.column_names:
            raise DataError(f"task {spec.name}: the data has no column '{col}' (columns: {', '.join(ds.column_names)})")
    text_columns = list(spec.text_columns)

    def encode(batch):
        texts = [batch[c] for c in text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_seq_length, padding=False)
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = batch["label"]
        return out

    keep = {"idx"}
    remove = [c for c in ds.column_names if c not in keep]
    split = str(ds.split) if ds.split is not None else "split"
    out = cached_map(
        ds, encode, name=f"{spec.name}-{split}-glue", cache_dir=cache_dir, remove_columns=remove,
        key=["glue", spec.name, tokenizer_fingerprint(tokenizer), int(max_seq_length), text_columns],
        desc=f"Tokenizing {spec.name} {split}",
    )
    if "idx" not in out.column_names:
        out = with_position_idx(out)
    return out
