"""SQuAD v1.1: reading (real dev file and small synthetic files), token windows and answer positions, and
post-processing span logits back to answer text."""
import gzip
import json
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pytest

from cap.data import (
    DataError, load_task_data, postprocess_qa_predictions, prepare_eval_features, prepare_train_features,
    read_squad_split, subsample, tokenize_squad,
)


@pytest.fixture(scope="module")
def squad_dev(data_dir):
    return read_squad_split(data_dir, "validation")


def squad_doc(paragraphs: list[tuple[str, list[tuple[str, str, list[tuple[str, int]]]]]], title="T") -> dict:
    """{"data": [...]} from [(context, [(id, question, [(answer text, answer_start), ...]), ...]), ...]."""
    return {"version": "1.1", "data": [{"title": title, "paragraphs": [
        {"context": ctx, "qas": [{"id": qid, "question": q, "answers": [{"text": t, "answer_start": s} for t, s in ans]}
                                 for qid, q, ans in qas]}
        for ctx, qas in paragraphs]}]}


def write_squad(root: Path, name: str, doc) -> Path:
    folder = root / "squad"
    folder.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(doc) if not isinstance(doc, (str, bytes)) else doc)
    data = data.encode("utf-8") if isinstance(data, str) else data
    path = folder / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def norm(text: str) -> str:
    """Lower case, no accents, no whitespace: what an uncased WordPiece decode can be compared on."""
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) != "Mn")


# ------------------------------------------------------------------------------------------------------- reading

def test_real_dev_file(squad_dev, data_dir):
    assert len(squad_dev) == 10570
    assert squad_dev.column_names == ["id", "title", "context", "question", "answers"]
    first = squad_dev[0]
    assert first["id"] == "56be4db0acb8001400a502ec" and first["title"] == "Super_Bowl_50"
    assert first["question"] == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first["answers"] == {"text": ["Denver Broncos"] * 3, "answer_start": [177] * 3}
    assert first["context"][177:177 + len("Denver Broncos")] == "Denver Broncos"
    assert len(set(squad_dev["id"][:])) == 10570
    assert read_squad_split(data_dir, "dev")[100] == squad_dev[100]


def test_synthetic_file_plain_and_gzip(tmp_path):
    doc = squad_doc([("Paris is the capital of France.", [("q1", "What is the capital of France?", [("Paris", 0)])]),
                     ("Alan Turing was born in 1912.",
                      [("q2", "When was Turing born?", [("1912", 24), ("1912", 24)])])])
    write_squad(tmp_path / "a", "dev-v1.1.json", doc)
    write_squad(tmp_path / "b", "dev-v1.1.json.gz", doc)
    a = read_squad_split(tmp_path / "a", "validation")
    b = read_squad_split(tmp_path / "b", "dev")
    assert a.to_dict() == b.to_dict()
    assert a["id"][:] == ["q1", "q2"] and a[1]["answers"] == {"text": ["1912", "1912"], "answer_start": [24, 24]}
    assert a.features == read_squad_split(tmp_path / "b", "validation").features


def test_answer_offset_moved_to_the_nearest_copy_of_its_text(tmp_path):
    ctx = "red blue red green red"  # 'red' at 0, 9 and 19
    doc = squad_doc([(ctx, [("a", "q?", [("red", 8)]), ("b", "q?", [("red", 20)]), ("c", "q?", [("red", 0)]),
                            ("d", "q?", [("green", 3)])])])
    write_squad(tmp_path, "train-v1.1.json", doc)
    ds = read_squad_split(tmp_path, "train", split_option="data.train_split")
    assert [a["answer_start"][0] for a in ds["answers"]] == [9, 19, 0, 13]


def test_answer_not_in_context_names_the_question(tmp_path):
    doc = squad_doc([("Paris is the capital of France.", [("ok-1", "q?", [("Paris", 0)]),
                                                          ("broken-7", "q?", [("Berlin", 0)])])])
    path = write_squad(tmp_path, "dev-v1.1.json", doc)
    with pytest.raises(DataError) as err:
        read_squad_split(tmp_path, "validation")
    assert "'broken-7'" in str(err.value) and "Berlin" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("doc", [
    {"version": "1.1", "articles": []},
    [1, 2, 3],
    {"data": [{"title": "x", "contexts": []}]},
    {"data": [{"title": "x", "paragraphs": [{"context": "c", "questions": []}]}]},
    {"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [{"question": "q?", "answers": []}]}]}]},
])
def test_non_squad_json_names_the_file(tmp_path, doc):
    path = write_squad(tmp_path, "dev-v1.1.json.gz", doc)
    with pytest.raises(DataError) as err:
        read_squad_split(tmp_path, "validation")
    assert str(path) in str(err.value) and "not a SQuAD file" in str(err.value)


def test_broken_json_and_missing_split(tmp_path):
    write_squad(tmp_path, "dev-v1.1.json", '{"data": [\n{"title": ')
    with pytest.raises(DataError, match=r"dev-v1.1.json: not valid JSON \(line 2"):
        read_squad_split(tmp_path, "validation")
    with pytest.raises(DataError) as err:
        read_squad_split(tmp_path, "train", split_option="data.train_split")
    assert "splits present: validation" in str(err.value)
    (tmp_path / "glue-only").mkdir()
    with pytest.raises(DataError, match=r"no folder .*squad"):
        read_squad_split(tmp_path / "glue-only", "validation")


def test_hub_failure_says_to_set_the_data_dir(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(DataError) as err:
        read_squad_split(None, "validation")
    assert "rajpurkar/squad" in str(err.value) and "CAP_DATA_DIR" in str(err.value)


# ---------------------------------------------------------------------------------------------------- features

def check_train_features(examples, tokenizer, max_seq_length, doc_stride, max_query_length):
    """Train and eval windows of the same examples, checked against each other through the eval offsets: a window
    that holds the whole (first) answer labels its first/last token, any other window labels CLS (0)."""
    batch = examples.to_dict()
    train = prepare_train_features(batch, tokenizer, max_seq_length, doc_stride, max_query_length)
    evals = prepare_eval_features(batch, tokenizer, max_seq_length, doc_stride, max_query_length)
    assert train["input_ids"] == evals["input_ids"]
    contexts = dict(zip(batch["id"], batch["context"]))
    answers = dict(zip(batch["id"], batch["answers"]))
    n_inside = n_outside = 0
    for i, ids in enumerate(train["input_ids"]):
        assert len(ids) <= max_seq_length
        eid, offsets = evals["example_id"][i], evals["offset_mapping"][i]
        start_char = answers[eid]["answer_start"][0]
        text = answers[eid]["text"][0]
        end_char = start_char + len(text)
        ctx_tokens = [k for k, o in enumerate(offsets) if o is not None]
        inside = offsets[ctx_tokens[0]][0] <= start_char and end_char <= offsets[ctx_tokens[-1]][1]
        s, e = train["start_positions"][i], train["end_positions"][i]
        if not inside:
            assert s == e == 0
            n_outside += 1
            continue
        n_inside += 1
        assert 0 < s <= e and offsets[s] is not None and offsets[e] is not None
        assert offsets[s][0] <= start_char < offsets[s][1] or offsets[s][0] == start_char
        assert offsets[e][0] < end_char <= offsets[e][1]
        span = contexts[eid][offsets[s][0]:offsets[e][1]]
        assert text in span
        decoded = norm(tokenizer.decode(ids[s:e + 1]))
        assert norm(text) in decoded.replace("##", "")
        # the span is minimal: without its first or last token the answer is no longer covered
        if e > s:
            assert text not in contexts[eid][offsets[s + 1][0]:offsets[e][1]]
            assert text not in contexts[eid][offsets[s][0]:offsets[e - 1][1]]
    return n_inside, n_outside, len(train["input_ids"]), len(batch["id"])


def test_windows_on_real_dev_examples(squad_dev, tokenizer):
    inside, outside, n_features, n_examples = check_train_features(
        squad_dev.select(range(60)), tokenizer, max_seq_length=128, doc_stride=32, max_query_length=24)
    assert n_features > 1.5 * n_examples and outside > 0 and inside >= n_examples  # several windows each


def test_windows_on_a_long_synthetic_context(tokenizer):
    filler = " ".join(f"word{i}" for i in range(150))
    context = f"{filler} The treasure is buried under the old oak tree. {filler}"
    start = context.index("under the old oak tree")
    ex = datasets.Dataset.from_dict({
        "id": ["x"], "title": ["t"], "context": [context], "question": ["Where is the treasure?"],
        "answers": [{"text": ["under the old oak tree"], "answer_start": [start]}]})
    inside, outside, n_features, _ = check_train_features(ex, tokenizer, max_seq_length=48, doc_stride=16,
                                                          max_query_length=16)
    assert n_features >= 10 and inside >= 1 and outside >= 8
    feats = prepare_train_features(ex.to_dict(), tokenizer, 48, 16, 16)
    found = [tokenizer.decode(ids[s:e + 1]) for ids, s, e in
             zip(feats["input_ids"], feats["start_positions"], feats["end_positions"]) if s > 0]
    assert found and all(f == "under the old oak tree" for f in found)


def test_long_questions_are_cut_to_max_query_length(tokenizer):
    question = " ".join(["why"] * 100) + "?"
    ex = {"id": ["q"], "title": ["t"], "context": ["Because it is so. " * 5], "question": ["   " + question],
          "answers": [{"text": ["Because"], "answer_start": [0]}]}
    feats = prepare_eval_features(ex, tokenizer, max_seq_length=64, doc_stride=8, max_query_length=10)
    ids = feats["input_ids"][0]
    why = tokenizer.convert_tokens_to_ids(["why"])
    assert ids[:12] == [tokenizer.cls_token_id] + why * 10 + [tokenizer.sep_token_id]
    assert feats["offset_mapping"][0][:12] == [None] * 12 and feats["offset_mapping"][0][12] == [0, 7]


def test_window_options_are_checked(squad_dev, tokenizer, tmp_path):
    with pytest.raises(DataError, match="doc_stride=128"):
        tokenize_squad(squad_dev.select(range(2)), tokenizer, train=True, max_seq_length=128, doc_stride=128,
                       max_query_length=64, cache_dir=tmp_path)


def test_tokenize_squad_idx_columns_and_cache(squad_dev, tokenizer, tmp_path, monkeypatch):
    examples = squad_dev.select(range(40))
    kw = dict(max_seq_length=128, doc_stride=32, max_query_length=32, cache_dir=tmp_path)
    train = tokenize_squad(examples, tokenizer, train=True, **kw)
    evals = tokenize_squad(examples, tokenizer, train=False, **kw)
    assert set(train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "start_positions",
                                       "end_positions", "idx"}
    assert set(evals.column_names) == {"input_ids", "token_type_ids", "attention_mask", "example_id",
                                       "offset_mapping", "idx"}
    assert len(train) == len(evals) > 40
    assert train["idx"][:] == list(range(len(train))) == evals["idx"][:]
    assert set(evals["example_id"][:]) == set(examples["id"][:])
    with monkeypatch.context() as m:
        m.setattr(datasets.Dataset, "map", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not cached")))
        again = tokenize_squad(examples, tokenizer, train=True, **kw)
    assert again.to_dict() == train.to_dict()


def test_load_task_data_squad(data_dir, tokenizer, tmp_path):
    data = load_task_data("squad", tokenizer, data_dir=data_dir, train_split="dev", max_train_samples=25,
                          max_eval_samples=12, max_seq_length=128, doc_stride=32, max_query_length=32, seed=7,
                          cache_dir=tmp_path)
    assert list(data.evals) == ["validation"] and data.spec.is_qa
    assert data.train["idx"][:] == list(range(len(data.train))) and len(data.train) > 25
    examples = data.eval_examples["validation"]
    assert len(examples) == 12
    assert set(data.evals["validation"]["example_id"][:]) == set(examples["id"][:])
    same = subsample(read_squad_split(data_dir, "validation"), 12, 7)
    assert same["id"][:] == examples["id"][:]


# ---------------------------------------------------------------------------------------------- post-processing

def perfect_logits(features, examples, width, rng):
    """Noise everywhere, -100 past each feature's end (as Trainer pads), and a spike at the first answer's first and
    last token in every window that holds the whole answer."""
    answers = {e["id"]: e["answers"] for e in examples}
    n = len(features)
    start = rng.normal(0, 1, (n, width))
    end = rng.normal(0, 1, (n, width))
    for i, (eid, offsets) in enumerate(zip(features["example_id"], features["offset_mapping"])):
        start[i, len(offsets):] = end[i, len(offsets):] = -100.0
        a = answers[eid]["answer_start"][0]
        b = a + len(answers[eid]["text"][0])
        s = [k for k, o in enumerate(offsets) if o is not None and o[0] <= a < o[1]]
        e = [k for k, o in enumerate(offsets) if o is not None and o[0] < b <= o[1]]
        if s and e:
            start[i, s[0]] += 20.0
            end[i, e[0]] += 20.0
    return start, end


def test_postprocess_recovers_gold_answers(squad_dev, tokenizer, tmp_path):
    examples = squad_dev.select(range(0, 600, 20))  # 30 examples from several articles
    features = tokenize_squad(examples, tokenizer, train=False, max_seq_length=96, doc_stride=24,
                              max_query_length=32, cache_dir=tmp_path)
    assert len(features) > 2 * len(examples)
    start, end = perfect_logits(features, examples, width=100, rng=np.random.default_rng(0))
    predictions = postprocess_qa_predictions(examples, features, start, end)
    assert set(predictions) == set(examples["id"][:])
    gold = {e["id"]: e["answers"]["text"][0] for e in examples}
    assert predictions == gold


def test_postprocess_skips_invalid_spans():
    context = "aa bb cc dd ee"
    features = datasets.Dataset.from_dict({
        "example_id": ["x", "x"],
        # window 1: [CLS] q [SEP] aa bb cc [SEP]; window 2: [CLS] q [SEP] cc dd ee [SEP]
        "offset_mapping": [[None, None, None, [0, 2], [3, 5], [6, 8], None],
                           [None, None, None, [6, 8], [9, 11], [12, 14], None]],
    })
    examples = datasets.Dataset.from_dict({"id": ["x", "y"], "context": [context, "zz"]})
    start = np.full((2, 8), -100.0)
    end = np.full((2, 8), -100.0)
    start[0, 0] = end[0, 0] = 50.0  # CLS: not a context token
    start[0, 1] = end[0, 2] = 40.0  # question tokens
    start[0, 7] = end[0, 7] = 60.0  # padding past the feature's length
    start[0, 5], end[0, 3] = 30.0, 30.0  # end before start
    start[1, 3], end[1, 5] = 5.0, 5.0  # valid: "cc dd ee", score 10
    start[0, 4], end[0, 4] = 4.0, 4.0  # valid: "bb", score 8
    out = postprocess_qa_predictions(examples, features, start, end)
    assert out == {"x": "cc dd ee", "y": ""}
    # a maximum answer length of 2 tokens rules out "cc dd ee" (3 tokens)
    out = postprocess_qa_predictions(examples, features, start, end, max_answer_length=2)
    assert out["x"] == "bb"
    with pytest.raises(ValueError):
        postprocess_qa_predictions(examples, features, start[:1], end[:1])
