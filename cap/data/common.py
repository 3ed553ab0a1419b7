"""Shared pieces of the data readers: reading (gzipped) local files, split look-up, hub access, tokenisation cache."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import zlib
from pathlib import Path
from typing import Callable, Iterable

import datasets
import numpy as np

from cap.data.tasks import DataError

log = logging.getLogger(__name__)

# bump when a tokenisation function changes its output, so that old cache files are not reused
CACHE_VERSION = "cap-data-1"

# hub split name -> local file stem
HUB_TO_LOCAL = {"validation": "dev", "validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched"}
LOCAL_TO_HUB = {v: k for k, v in HUB_TO_LOCAL.items()}
DATA_DIR_HINT = "set CAP_DATA_DIR (or data.dir=) to a local copy"


def read_text(path: Path) -> str:
    """The whole file as text: gzip or plain (decided by content), UTF-8 (a leading BOM is dropped).

    Raises DataError for an empty file, a broken gzip stream, or bytes that are not UTF-8 (with the line number)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read it ({err}); replace it with a good copy") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: bytes that are not UTF-8 ({raw[err.start:err.start + 4]!r}); "
            "re-encode the file as UTF-8"
        ) from err
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataError(f"{path} is empty; replace it with a good copy of the split or remove it")
    return text


def split_lines(text: str) -> list[str]:
    """Lines split on \\n only (not on the other Unicode line breaks that str.splitlines knows), without \\r;
    trailing empty lines are dropped, so a missing final newline makes no difference."""
    lines = text.split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every non-empty line of a JSON-lines file."""
    rows = []
    for lineno, line in enumerate(split_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg}); fix or remove that line") from err
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object per line, found {type(obj).__name__}")
        rows.append((lineno, obj))
    if not rows:
        raise DataError(f"{path} is empty; replace it with a good copy of the split or remove it")
    return rows


SUFFIXES = (".tsv", ".tsv.gz", ".jsonl", ".jsonl.gz", ".json", ".json.gz")


def present_splits(folder: Path, suffixes: Iterable[str] = SUFFIXES) -> list[str]:
    """Split names (file stems) of the data files in `folder`, sorted."""
    names = set()
    if folder.is_dir():
        for p in folder.iterdir():
            for suffix in suffixes:
                if p.is_file() and p.name.endswith(suffix) and len(p.name) > len(suffix):
                    names.add(p.name[: -len(suffix)])
    return sorted(names)


def find_file(folder: Path, stems: Iterable[str], suffixes: Iterable[str]) -> Path | None:
    """The first `<stem><suffix>` that exists in `folder` (stems, then suffixes, in the given order)."""
    for stem in stems:
        for suffix in suffixes:
            p = folder / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def check_data_dir(data_dir: str | Path) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist; {DATA_DIR_HINT}, or unset it to read the hub")
    return root


def suggest_split(present: list[str], option: str) -> str:
    """`option=<a split that is present>`, preferring dev-like splits for evaluation and train for training."""
    if not present:
        return ""
    if option.endswith("train_split"):
        order = ["train"]
    else:
        order = ["dev", "validation", "dev_matched", "heldout"]
    pick = next((s for s in order if s in present), None) or next((s for s in present if s != "train"), present[0])
    return f"{option}={pick}"


def load_from_hub(path: str, config: str | None, split: str) -> datasets.Dataset:
    """`datasets.load_dataset(path, config, split=split)`; any failure becomes a DataError that says how to use a
    local copy instead."""
    split = LOCAL_TO_HUB.get(split, split)
    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as err:  # network, offline mode, unknown split, missing cache: all end the same way
        where = f"{path}" + (f" ({config})" if config else "")
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"could not load split '{split}' of {where} from the Hugging Face hub "
            f"({type(err).__name__}: {detail[:300]}); {DATA_DIR_HINT} laid out as glue/<TASK>/<split>.tsv[.gz] "
            "and squad/{train,dev}-v1.1.json[.gz]"
        ) from err


# ---------------------------------------------------------------------------------------------------------------
# tokenisation cache


def hash_parts(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:20]


_TOKENIZER_FPS: dict[int, tuple[object, str]] = {}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's output: class, vocabulary and pipeline, truncation side, inputs."""
    cached = _TOKENIZER_FPS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    fp = hash_parts(
        type(tokenizer).__name__, hashlib.sha256(body.encode("utf-8")).hexdigest(),
        getattr(tokenizer, "truncation_side", "right"), list(getattr(tokenizer, "model_input_names", [])),
        sorted((k, v) for k, v in getattr(tokenizer, "init_kwargs", {}).items()
               if k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars")),
    )
    _TOKENIZER_FPS[id(tokenizer)] = (tokenizer, fp)
    return fp


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "cap"


def cached_map(ds: datasets.Dataset, function: Callable, *, name: str, key: list, cache_dir: str | Path | None,
               remove_columns: list[str], desc: str) -> datasets.Dataset:
    """`ds.map(function, batched=True)`, written to `<cache_dir>/<name>-<hash>.arrow` and read back from there the
    next time. The hash covers the dataset's content fingerprint, `key` (tokenizer, lengths, ...) and
    CACHE_VERSION. Without cache_dir the datasets library's cache folder is used; with caching disabled
    (`datasets.disable_caching()`) and no cache_dir, the result stays in memory."""
    fingerprint = hash_parts(CACHE_VERSION, ds._fingerprint, len(ds), key)
    kwargs = dict(batched=True, remove_columns=remove_columns, desc=desc, new_fingerprint=fingerprint)
    if cache_dir is None and not datasets.is_caching_enabled():
        return ds.map(function, keep_in_memory=True, **kwargs)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = folder / f"{safe_name}-{fingerprint}.arrow"
    if path.is_file():
        try:
            out = datasets.Dataset.from_file(str(path))
            log.info("reusing tokenised %s from %s", name, path)
            return out
        except Exception as err:  # a half-written or corrupt file: make it again
            log.warning("cache file %s is unreadable (%s); tokenising again", path, err)
            path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return ds.map(function, cache_file_name=str(path), load_from_cache_file=False, **kwargs)


def with_position_idx(ds: datasets.Dataset, column: str = "idx") -> datasets.Dataset:
    """`ds` with `column` = 0..len-1 (replacing an existing one), as int32 like the hub's idx."""
    if column in ds.column_names:
        ds = ds.remove_columns(column)
    return ds.add_column(column, np.arange(len(ds), dtype=np.int32), feature=datasets.Value("int32"))


def carve(ds: datasets.Dataset, size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, carved): a seeded random `size` of the rows (a fraction of them if < 1, else a count) split off `ds`,
    both kept in their original order and disjoint. `rest` is renumbered like a subsample (`source_idx` keeps the
    original ids); `carved` keeps its rows' ids."""
    n = int(round(size * len(ds))) if size < 1 else int(size)
    if not 0 < n < len(ds):
        raise DataError(f"data.validation_from_train={size:g}: gives {n} of the {len(ds)} training rows; use a "
                        f"fraction in (0, 1) or a count in [1, {len(ds) - 1}]")
    rng = np.random.default_rng(seed)
    held = np.zeros(len(ds), dtype=bool)
    held[rng.choice(len(ds), size=n, replace=False)] = True
    rest = ds.select(np.flatnonzero(~held))
    if "idx" in rest.column_names:
        rest = with_position_idx(rest.rename_column("idx", "source_idx") if "source_idx" not in rest.column_names
                                 else rest)
    return rest, ds.select(np.flatnonzero(held))


def subsample(ds: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """A seeded random choice of `n` rows kept in their original order; `ds` itself if n is None or >= len(ds).

    When rows are dropped and `ds` has an `idx` column, the original ids move to `source_idx` and `idx` is
    renumbered 0..n-1 (contrastive banks are indexed by the position in the training set)."""
    if n is None or n >= len(ds):
        return ds
    if n < 0:
        raise DataError(f"cannot take {n} samples: use a positive number, or null for all rows")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ds), size=int(n), replace=False))
    out = ds.select(rows)
    if "idx" in out.column_names:
        if "source_idx" not in out.column_names:
            out = out.rename_column("idx", "source_idx")
        out = with_position_idx(out)
    return out
