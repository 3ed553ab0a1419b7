"""SQuAD v1.1: read a split (local JSON or the hub), cut it into token windows, map span logits back to text."""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from functools import partial
from pathlib import Path

import datasets
import numpy as np

from cap.data.common import (
    cached_map, check_data_dir, find_file, load_from_hub, present_splits, read_text, suggest_split,
    tokenizer_fingerprint, with_position_idx,
)
from cap.data.tasks import DataError, get_task

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".json.gz")
# split name -> local file stems, most specific first
SQUAD_FILES = {"train": ("train-v1.1", "train"), "validation": ("dev-v1.1", "dev"), "dev": ("dev-v1.1", "dev")}

SQUAD_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "title": datasets.Value("string"),
    "context": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": {"text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32"))},
})

_LAYOUT = ('{"data": [{"title": ..., "paragraphs": [{"context": ..., '
           '"qas": [{"id": ..., "question": ..., "answers": [{"text": ..., "answer_start": ...}]}]}]}]}')


def _fix_answer_start(context: str, text: str, start, qid: str, path: Path) -> int:
    """`start` if the answer text is there; else the occurrence of the text nearest to `start`; DataError if the
    text is nowhere in the context."""
    if not isinstance(text, str) or not text:
        raise DataError(f"{path}: question id {qid!r} has an empty or non-text answer ({text!r})")
    if not isinstance(start, int) or isinstance(start, bool):
        raise DataError(f"{path}: question id {qid!r}: answer_start {start!r} is not an integer")
    if start >= 0 and context[start:start + len(text)] == text:  # a negative start would slice from the end
        return start
    hits, pos = [], context.find(text)
    while pos != -1:
        hits.append(pos)
        pos = context.find(text, pos + 1)
    if not hits:
        raise DataError(
            f"{path}: the answer {text[:80]!r} of question id {qid!r} does not occur in its context; "
            "fix or remove that question"
        )
    return min(hits, key=lambda h: (abs(h - start), h))


def parse_squad_json(text: str, path: Path) -> dict[str, list]:
    """Columns id, title, context, question, answers from the text of a SQuAD v1.1 JSON file."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    if not (isinstance(doc, dict) and isinstance(doc.get("data"), list) and doc["data"]):
        raise DataError(f"{path} is not a SQuAD file: expected {_LAYOUT}")
    cols: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    seen: set[str] = set()
    moved: list[str] = []  # ids of questions with an answer_start that missed its text
    for a_i, article in enumerate(doc["data"]):
        if not (isinstance(article, dict) and isinstance(article.get("paragraphs"), list)):
            raise DataError(f"{path} is not a SQuAD file: article {a_i} has no 'paragraphs' list; expected {_LAYOUT}")
        title = article.get("title", "")
        for p_i, par in enumerate(article["paragraphs"]):
            if not (isinstance(par, dict) and isinstance(par.get("context"), str) and isinstance(par.get("qas"), list)):
                raise DataError(f"{path} is not a SQuAD file: article {a_i}, paragraph {p_i} has no 'context' "
                                f"text and 'qas' list; expected {_LAYOUT}")
            context = par["context"]
            for q_i, qa in enumerate(par["qas"]):
                if not (isinstance(qa, dict) and isinstance(qa.get("question"), str)
                        and isinstance(qa.get("answers"), list) and "id" in qa):
                    raise DataError(f"{path} is not a SQuAD file: article {a_i}, paragraph {p_i}, question {q_i} "
                                    f"lacks 'id', 'question' or an 'answers' list; expected {_LAYOUT}")
                qid = str(qa["id"])
                if qid in seen:
                    raise DataError(f"{path}: question id {qid!r} occurs twice; ids must be unique")
                seen.add(qid)
                texts, starts = [], []
                for ans in qa["answers"]:
                    if not isinstance(ans, dict):
                        raise DataError(f"{path}: question id {qid!r} has an answer that is not an object")
                    texts.append(ans.get("text"))
                    starts.append(_fix_answer_start(context, ans.get("text"), ans.get("answer_start"), qid, path))
                    if starts[-1] != ans.get("answer_start"):
                        moved.append(qid)
                cols["id"].append(qid)
                cols["title"].append(title if isinstance(title, str) else str(title))
                cols["context"].append(context)
                cols["question"].append(qa["question"])
                cols["answers"].append({"text": texts, "answer_start": starts})
    if not cols["id"]:
        raise DataError(f"{path} holds no questions; replace it with a good copy of the split")
    if moved:
        log.warning("%s: %d answer_start offsets do not point at their answer text (first: question id %r); each "
                    "was moved to the nearest occurrence of the text in its context", path, len(moved), moved[0])
    return cols


def read_squad_split(data_dir: str | Path | None, split: str, *,
                     split_option: str = "data.eval_split") -> datasets.Dataset:
    """One SQuAD v1.1 split with the hub's columns (id, title, context, question, answers{text, answer_start}).

    data_dir None reads `rajpurkar/squad` from the hub; otherwise `<data_dir>/squad/train-v1.1.json[.gz]` (train)
    or `dev-v1.1.json[.gz]` (validation / dev), or `<split>.json[.gz]` for any other name. An answer_start that
    does not point at its answer text is moved to the nearest occurrence of the text in the context."""
    spec = get_task("squad")
    if data_dir is None:
        return load_from_hub(spec.hub_path, spec.hub_config, split)
    folder = check_data_dir(data_dir) / "squad"
    if not folder.is_dir():
        raise DataError(f"no folder {folder} for task squad: put train-v1.1.json[.gz] and dev-v1.1.json[.gz] there "
                        "or point data.dir / CAP_DATA_DIR at a copy that has them")
    stems = SQUAD_FILES.get(split, (split, f"{split}-v1.1"))
    path = find_file(folder, stems, JSON_SUFFIXES)
    if path is None:
        names = {"train-v1.1": "train", "dev-v1.1": "validation"}
        present = sorted({names.get(s, s) for s in present_splits(folder, JSON_SUFFIXES)})
        hint = suggest_split(present, split_option)
        raise DataError(
            f"task squad has no split '{split}' in {folder} (looked for {stems[0]}.json[.gz]); splits present: "
            f"{', '.join(present) or 'none'}" + (f"; use {hint}" if hint else "")
        )
    return datasets.Dataset.from_dict(parse_squad_json(read_text(path), path), features=SQUAD_FEATURES, split=split)


# ---------------------------------------------------------------------------------------------------------------
# features


def check_window(tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int) -> None:
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_seq_length - max_query_length - specials  # context tokens per window, at the least
    if max_query_length < 1 or room < 1 or not 0 <= doc_stride < room:
        raise DataError(
            f"SQuAD windows: max_seq_length={max_seq_length} leaves {room} context tokens after a question of up "
            f"to max_query_length={max_query_length} tokens and {specials} special tokens; doc_stride={doc_stride} "
            "(the overlap of consecutive windows) must be >= 0 and smaller than that: lower data.doc_stride or "
            "data.max_query_length, or raise data.max_seq_length"
        )


def _truncate_questions(questions: list[str], tokenizer, max_query_length: int) -> list[str]:
    """Questions cut after their first max_query_length tokens (leading whitespace removed)."""
    questions = [q.lstrip() for q in questions]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, offsets in zip(questions, enc["offset_mapping"]):
        if len(offsets) > max_query_length:
            q = q[: offsets[max_query_length - 1][1]]
        out.append(q)
    return out


def _windows(examples, tokenizer, max_seq_length, doc_stride, max_query_length):
    questions = _truncate_questions(examples["question"], tokenizer, max_query_length)
    return tokenizer(
        questions, examples["context"], truncation="only_second", max_length=max_seq_length, stride=doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding=False,
    )


def _model_inputs(enc) -> dict[str, list]:
    return {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc}


def prepare_train_features(examples, tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                           max_query_length: int = 64) -> dict[str, list]:
    """Batched map function: [CLS] question [SEP] context-window [SEP] features, consecutive windows overlapping
    by doc_stride tokens. start/end_positions are the answer's first/last token when the (first) answer lies
    wholly inside the window, else both the CLS index."""
    enc = _windows(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        answers = examples["answers"][enc["overflow_to_sample_mapping"][i]]
        seq = enc.sequence_ids(i)
        start = end = cls
        if answers["answer_start"] and 1 in seq:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            first = seq.index(1)
            last = len(seq) - 1 - seq[::-1].index(1)
            if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                s = first
                while s <= last and offsets[s][0] <= start_char:
                    s += 1
                e = last
                while e >= first and offsets[e][1] >= end_char:
                    e -= 1
                start, end = s - 1, e + 1
        starts.append(start)
        ends.append(end)
    out = _model_inputs(enc)
    out["start_positions"] = starts
    out["end_positions"] = ends
    return out


def prepare_eval_features(examples, tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                          max_query_length: int = 64) -> dict[str, list]:
    """The windows of prepare_train_features, with `example_id` and `offset_mapping` (character span in the
    context for context tokens, None for question and special tokens)."""
    enc = _windows(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    example_ids, offset_mapping = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        example_ids.append(examples["id"][enc["overflow_to_sample_mapping"][i]])
        offset_mapping.append([list(o) if s == 1 else None for o, s in zip(offsets, seq)])
    out = _model_inputs(enc)
    out["example_id"] = example_ids
    out["offset_mapping"] = offset_mapping
    return out


def tokenize_squad(ds: datasets.Dataset, tokenizer, *, train: bool, max_seq_length: int = 384,
                   doc_stride: int = 128, max_query_length: int = 64,
                   cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Features of a SQuAD split: input_ids, token_type_ids, attention_mask, idx (feature position 0..n-1), and
    start/end_positions (train) or example_id/offset_mapping (eval). Cached like tokenize_glue."""
    check_window(tokenizer, max_seq_length, doc_stride, max_query_length)
    fn = prepare_train_features if train else prepare_eval_features
    kind = "train" if train else "eval"
    split = str(ds.split) if ds.split is not None else "split"
    out = cached_map(
        ds, partial(fn, tokenizer=tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                    max_query_length=max_query_length),
        name=f"squad-{split}-{kind}", cache_dir=cache_dir, remove_columns=list(ds.column_names),
        key=["squad", kind, tokenizer_fingerprint(tokenizer), int(max_seq_length), int(doc_stride),
             int(max_query_length)],
        desc=f"Tokenizing squad {split} ({kind} windows)",
    )
    return with_position_idx(out)


# ---------------------------------------------------------------------------------------------------------------
# post-processing


def _column(ds: datasets.Dataset, name: str) -> list:
    return ds.select_columns([name]).to_dict()[name]


def _offset_arrays(features: datasets.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """offset_mapping as flat arrays (token start char, token end char; -1 where the offset is None) and the
    bounds of each feature's tokens in them, read through Arrow (much faster than Python lists)."""
    import pyarrow.compute as pc

    table = features.select_columns(["offset_mapping"]).with_format("arrow")[:]
    column = table.column("offset_mapping").combine_chunks()
    tokens = column.values  # the child array of a sliced list array is not sliced: the offsets index into it
    starts = pc.list_element(tokens, 0).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = pc.list_element(tokens, 1).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return starts, ends, column.offsets.to_numpy().astype(np.int64)


def postprocess_qa_predictions(examples: datasets.Dataset, features: datasets.Dataset, start_logits, end_logits,
                               n_best_size: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """{example id: answer text}. For every feature of an example, the n_best_size highest start and end logits
    among its context tokens are paired; pairs with end < start or longer than max_answer_length tokens are
    skipped; the best start+end score over all the example's features wins and is mapped back to the context
    through offset_mapping. An example with no valid pair gets "". Logit rows may be padded past a feature's
    length (as Trainer.predict pads them); those positions are ignored."""
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    if start_logits.shape != end_logits.shape or start_logits.ndim != 2 or len(start_logits) != len(features):
        raise ValueError(f"start/end logits of shape {start_logits.shape} / {end_logits.shape} do not match "
                         f"{len(features)} features")
    by_example: dict[str, list[int]] = defaultdict(list)
    for i, eid in enumerate(_column(features, "example_id")):
        by_example[eid].append(i)
    char_starts, char_ends, bounds = _offset_arrays(features)

    answers = {}
    for eid, context in zip(_column(examples, "id"), _column(examples, "context")):
        best_score, best_text = -np.inf, ""
        for fi in by_example.get(eid, ()):
            lo = bounds[fi]
            n = min(bounds[fi + 1] - lo, start_logits.shape[1])
            f_starts, f_ends = char_starts[lo:lo + n], char_ends[lo:lo + n]
            valid = f_starts >= 0
            n_valid = int(valid.sum())
            if n_valid == 0:
                continue
            s_log = np.where(valid, start_logits[fi, :n], -np.inf)
            e_log = np.where(valid, end_logits[fi, :n], -np.inf)
            k = min(n_best_size, n_valid)
            s_idx = np.argsort(-s_log, kind="stable")[:k]
            e_idx = np.argsort(-e_log, kind="stable")[:k]
            length = e_idx[None, :] - s_idx[:, None] + 1
            ok = (length >= 1) & (length <= max_answer_length)
            if not ok.any():
                continue
            scores = np.where(ok, s_log[s_idx][:, None] + e_log[e_idx][None, :], -np.inf)
            a, b = np.unravel_index(np.argmax(scores), scores.shape)
            if scores[a, b] > best_score:
                best_score = scores[a, b]
                best_text = context[f_starts[s_idx[a]]: f_ends[e_idx[b]]]
        answers[eid] = best_text
    return answers
