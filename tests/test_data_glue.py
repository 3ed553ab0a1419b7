"""GLUE data: the local readers against the real files in ../shared/data, error messages, tokenising, caching,
subsampling and the load_task_data entry point."""
import gzip
import json
from pathlib import Path

import datasets
import pytest

from cap.data import (
    TASKS, DataError, TaskData, get_task, load_task_data, read_glue_split, subsample, tokenize_glue,
)
from cap.errors import UserError


def raw_lines(path: Path) -> list[str]:
    """The file's lines, read independently of the code under test."""
    return gzip.open(path, "rb").read().decode("utf-8").split("\n")


def make_glue_dir(root: Path, task_dir: str, files: dict[str, bytes | str]) -> Path:
    """<root>/glue/<task_dir>/<name> for each file (bytes written as they are; names ending in .gz compressed)."""
    folder = root / "glue" / task_dir
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.encode("utf-8") if isinstance(content, str) else content
        if name.endswith(".gz"):
            data = gzip.compress(data)
        (folder / name).write_bytes(data)
    return root


# --------------------------------------------------------------------------------------------------- task registry

def test_task_registry():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "squad"}
    mnli = get_task("mnli")
    assert mnli.label_names == ("entailment", "neutral", "contradiction") and mnli.num_labels == 3
    assert mnli.text_columns == ("premise", "hypothesis")
    assert list(mnli.default_eval_splits) == ["validation_matched", "validation_mismatched"]
    assert get_task("qqp").text_columns == ("question1", "question2")
    assert get_task("qnli").text_columns == ("question", "sentence")
    assert get_task("qnli").label_names == get_task("rte").label_names == ("entailment", "not_entailment")
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.glue_dir == "STS-B"
    squad = get_task("squad")
    assert squad.is_qa and squad.glue_dir is None and squad.hub_path == "rajpurkar/squad"
    assert get_task("SST-2") is get_task("sst2") and get_task("sst2").hub_config == "sst2"
    for spec in TASKS.values():
        if not spec.is_qa:
            assert spec.hub_path == "nyu-mll/glue" and spec.hub_config == spec.name


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_task("imdb")
    assert isinstance(err.value, DataError) and isinstance(err.value, UserError)
    assert "imdb" in str(err.value)
    for name in ("cola", "mnli", "squad"):
        assert name in str(err.value)


# ------------------------------------------------------------------------------------------------ real data files

@pytest.mark.parametrize("task,split,rows", [
    ("sst2", "dev", 872), ("sst2", "train", 67349), ("cola", "dev", 1043), ("cola", "train", 8551),
    ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("qqp", "train", 23497), ("qqp", "heldout", 9372),
    ("stsb", "dev", 1500), ("rte", "dev", 277), ("wnli", "train", 635), ("qnli", "dev", 5463),
    ("qnli", "train", 9999), ("mnli", "train", 8999), ("mnli", "heldout", 1000), ("mnli", "sample", 240),
])
def test_row_counts_columns_and_idx(data_dir, task, split, rows):
    spec = get_task(task)
    ds = read_glue_split(data_dir, task, split)
    assert len(ds) == rows
    assert ds.column_names == [*spec.text_columns, "label", "idx"]
    assert ds["idx"][:] == list(range(rows))
    labels = ds["label"][:]
    if spec.is_regression:
        assert all(0.0 <= x <= 5.0 for x in labels)
    else:
        assert set(labels) == set(range(spec.num_labels))  # every class occurs, nothing else does


def test_sst2_dev_labels_and_text(data_dir):
    ds = read_glue_split(data_dir, "sst2", "validation")  # hub name -> dev.tsv.gz
    assert sum(ds["label"][:]) == 444 and len(ds) == 872  # README: 444 positive / 428 negative
    assert ds[0] == {"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0}


def test_cola_headerless_last_row_without_newline(data_dir):
    path = data_dir / "glue" / "CoLA" / "dev.tsv.gz"
    lines = raw_lines(path)
    assert lines[-1] != "" and len(lines) == 1043  # no final newline, no header: 1043 rows
    source, label, _, sentence = lines[-1].split("\t")
    ds = read_glue_split(data_dir, "cola", "dev")
    assert ds[-1] == {"sentence": sentence, "label": int(label), "idx": 1042}
    first = lines[0].split("\t")
    assert ds[0]["sentence"] == first[3] and ds[0]["label"] == int(first[1])


def test_mrpc_header_with_bom(data_dir):
    path = data_dir / "glue" / "MRPC" / "train.tsv.gz"
    assert gzip.open(path, "rb").read(3) == b"\xef\xbb\xbf"
    ds = read_glue_split(data_dir, "mrpc", "train")
    assert len(ds) == 3668
    assert ds[0]["sentence1"].startswith("Amrozi accused his brother")
    assert ds[0]["sentence2"].startswith("Referring to him as only")
    assert ds[0]["label"] == 1 and ds[1]["label"] == 0
    # stray double quotes are text, not CSV quoting
    assert ds[0]["sentence1"].count('"') == 2


def test_stsb_scores_are_floats(data_dir):
    ds = read_glue_split(data_dir, "stsb", "dev")
    assert ds.features["label"].dtype == "float32"
    assert ds[0]["label"] == 5.0 and ds[1]["label"] == 4.75
    assert ds[0]["sentence1"] == "A man with a hard hat is dancing."


def test_mnli_tsv_labels_in_hub_order(data_dir):
    path = data_dir / "glue" / "MNLI" / "sample.tsv.gz"
    lines = [line.split("\t") for line in raw_lines(path) if line]
    header, rows = lines[0], lines[1:]
    gold, s1, s2 = header.index("gold_label"), header.index("sentence1"), header.index("sentence2")
    ds = read_glue_split(data_dir, "mnli", "sample")
    hub_id = {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert [hub_id[r[gold]] for r in rows] == ds["label"][:]
    assert rows[0][gold] == "neutral" and ds[0]["label"] == 1
    assert ds[0]["premise"] == rows[0][s1] and ds[0]["hypothesis"] == rows[0][s2]
    assert sorted(ds["label"][:]).count(1) == 80


def test_tsv_and_jsonl_give_the_same_dataset(data_dir, tmp_path):
    """The same MNLI rows as GLUE TSV (string labels) and as hub-schema JSON lines (ids): identical datasets."""
    lines = [line for line in raw_lines(data_dir / "glue" / "MNLI" / "sample.tsv.gz") if line]
    header = lines[0].split("\t")
    tsv = "\n".join(lines[:8]) + "\n"
    hub_id = {"entailment": 0, "neutral": 1, "contradiction": 2}
    jsonl = "".join(
        json.dumps({"premise": f[header.index("sentence1")], "hypothesis": f[header.index("sentence2")],
                    "label": hub_id[f[header.index("gold_label")]], "idx": i}) + "\n"
        for i, f in enumerate(line.split("\t") for line in lines[1:8])
    )
    make_glue_dir(tmp_path / "a", "MNLI", {"dev_matched.tsv": tsv})
    make_glue_dir(tmp_path / "b", "MNLI", {"dev_matched.jsonl.gz": jsonl})
    a = read_glue_split(tmp_path / "a", "mnli", "validation_matched")
    b = read_glue_split(tmp_path / "b", "mnli", "validation_matched")
    assert a.features == b.features
    assert a.column_names == b.column_names == ["premise", "hypothesis", "label", "idx"]
    assert a.to_dict() == b.to_dict() and len(a) == 7
    # and the real JSONL files have the same schema as the real TSV files
    heldout = read_glue_split(data_dir, "mnli", "heldout")
    assert heldout.features == read_glue_split(data_dir, "mnli", "sample").features


def test_plain_and_gzipped_files_read_the_same(data_dir, tmp_path):
    raw = gzip.open(data_dir / "glue" / "RTE" / "dev.tsv.gz", "rb").read()
    make_glue_dir(tmp_path, "RTE", {"dev.tsv": raw})
    plain = read_glue_split(tmp_path, "rte", "validation")
    assert plain.to_dict() == read_glue_split(data_dir, "rte", "dev").to_dict()
    assert plain[0]["label"] == 1 and plain[1]["label"] == 0  # not_entailment, entailment


def test_crlf_line_endings(tmp_path):
    make_glue_dir(tmp_path, "SST-2", {"dev.tsv": "sentence\tlabel\r\na b\t1\r\nc\t0\r\n"})
    assert read_glue_split(tmp_path, "sst2", "dev").to_dict() == {
        "sentence": ["a b", "c"], "label": [1, 0], "idx": [0, 1]}


# ---------------------------------------------------------------------------------------------------- error cases

def test_wrong_column_count_names_file_and_line(tmp_path):
    tsv = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta b\tnot_entailment\n2\tc\td\tentailment\n"
    make_glue_dir(tmp_path, "RTE", {"dev.tsv.gz": tsv})
    with pytest.raises(DataError) as err:
        read_glue_split(tmp_path, "rte", "dev")
    msg = str(err.value)
    assert "dev.tsv.gz" in msg and "line 3" in msg and "3 tab-separated columns, expected 4" in msg
    assert "\n" not in msg


def test_missing_split_lists_present_splits(data_dir):
    with pytest.raises(DataError) as err:
        read_glue_split(data_dir, "mnli", "validation_matched")
    msg = str(err.value)
    assert "validation_matched" in msg and "heldout, sample, train" in msg
    assert "data.eval_split=heldout" in msg
    with pytest.raises(DataError, match="data.eval_split=heldout"):
        read_glue_split(data_dir, "qqp", "validation")


def test_missing_task_folder_and_data_dir(tmp_path):
    make_glue_dir(tmp_path, "SST-2", {"dev.tsv": "sentence\tlabel\na\t1\n"})
    with pytest.raises(DataError, match=r"glue/CoLA"):
        read_glue_split(tmp_path, "cola", "dev")
    with pytest.raises(DataError, match="does not exist"):
        read_glue_split(tmp_path / "nowhere", "sst2", "dev")


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    content = b"sentence\tlabel\ngood\t1\nalso good\t0\nbad \xff\xfe byte\t1\n"
    make_glue_dir(tmp_path, "SST-2", {"train.tsv.gz": content})
    with pytest.raises(DataError) as err:
        read_glue_split(tmp_path, "sst2", "train")
    assert "train.tsv.gz" in str(err.value) and "line 4" in str(err.value) and "UTF-8" in str(err.value)


@pytest.mark.parametrize("name,content", [("dev.tsv", b""), ("dev.tsv.gz", b""), ("dev.jsonl", b"\n\n")])
def test_empty_file(tmp_path, name, content):
    make_glue_dir(tmp_path, "WNLI", {name: content})
    with pytest.raises(DataError, match=r"is empty") as err:
        read_glue_split(tmp_path, "wnli", "dev")
    assert name in str(err.value)


def test_header_only_file(tmp_path):
    make_glue_dir(tmp_path, "WNLI", {"dev.tsv": "index\tsentence1\tsentence2\tlabel\n"})
    with pytest.raises(DataError, match="no rows"):
        read_glue_split(tmp_path, "wnli", "dev")


@pytest.mark.parametrize("task_dir,task,content,line,value", [
    ("RTE", "rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", 3, "maybe"),
    ("QNLI", "qnli", "index\tquestion\tsentence\tlabel\n0\ta\tb\t1\n", 2, "1"),  # QNLI TSV labels are names
    ("SST-2", "sst2", "sentence\tlabel\nfine\t1\nbad\t2\n", 3, "2"),
    ("CoLA", "cola", "gj04\t1\t\tok\ngj04\tx\t\tnot ok\n", 2, "x"),
    ("STS-B", "stsb", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                      "0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n", 2, "7.5"),
])
def test_label_outside_the_task_set(tmp_path, task_dir, task, content, line, value):
    make_glue_dir(tmp_path, task_dir, {"dev.tsv": content})
    with pytest.raises(DataError) as err:
        read_glue_split(tmp_path, task, "dev")
    msg = str(err.value)
    assert "dev.tsv" in msg and f"line {line}" in msg and repr(value) in msg


def test_jsonl_errors(tmp_path):
    good = json.dumps({"premise": "a", "hypothesis": "b", "label": 2, "idx": 0})
    make_glue_dir(tmp_path, "MNLI", {"heldout.jsonl": good + "\n" + json.dumps(
        {"premise": "a", "hypothesis": "b", "label": 3, "idx": 1}) + "\n"})
    with pytest.raises(DataError, match=r"heldout.jsonl, line 2: label 3"):
        read_glue_split(tmp_path, "mnli", "heldout")
    make_glue_dir(tmp_path, "MNLI", {"heldout.jsonl": good + "\n{not json\n"})
    with pytest.raises(DataError, match=r"heldout.jsonl, line 2: not valid JSON"):
        read_glue_split(tmp_path, "mnli", "heldout")
    make_glue_dir(tmp_path, "MNLI", {"heldout.jsonl": json.dumps({"sentence1": "a", "sentence2": "b", "label": 0})})
    with pytest.raises(DataError, match=r"line 1: no 'premise' field"):
        read_glue_split(tmp_path, "mnli", "heldout")


def test_tsv_header_without_the_needed_columns(tmp_path):
    make_glue_dir(tmp_path, "QQP", {"train.tsv": "id\tq1\tq2\tdup\n1\ta\tb\t0\n"})
    with pytest.raises(DataError) as err:
        read_glue_split(tmp_path, "qqp", "train")
    assert "train.tsv, line 1" in str(err.value) and "'question1'" in str(err.value)


def go_offline(monkeypatch, tmp_path):
    """Offline mode with empty caches: as on a machine without network access (also when run with network)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_hub_failure_says_to_set_the_data_dir(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    with pytest.raises(DataError) as err:
        read_glue_split(None, "sst2", "validation")
    msg = str(err.value)
    assert "nyu-mll/glue" in msg and "CAP_DATA_DIR" in msg and "data.dir=" in msg and "\n" not in msg


# -------------------------------------------------------------------------------------------------- tokenisation

def test_tokenize_glue_pairs(data_dir, tokenizer, tmp_path):
    spec = get_task("rte")
    ds = read_glue_split(data_dir, "rte", "dev")
    feats = tokenize_glue(ds, tokenizer, spec, max_seq_length=32, cache_dir=tmp_path)
    assert set(feats.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert len(feats) == len(ds) and feats["idx"][:] == ds["idx"][:] and feats["labels"][:] == ds["label"][:]
    lengths = [len(x) for x in feats["input_ids"]]
    assert max(lengths) == 32 and min(lengths) < 32  # truncated, not padded
    row = feats[1]
    assert row["input_ids"][0] == tokenizer.cls_token_id and row["input_ids"].count(tokenizer.sep_token_id) == 2
    assert 1 in row["token_type_ids"] and len(row["attention_mask"]) == len(row["input_ids"])
    full = tokenize_glue(ds, tokenizer, spec, max_seq_length=512, cache_dir=tmp_path)
    expected = tokenizer(ds[1]["sentence1"], ds[1]["sentence2"])["input_ids"]
    assert full[1]["input_ids"] == expected


def test_tokenize_glue_single_sentence_and_regression(data_dir, tokenizer, tmp_path):
    sst = read_glue_split(data_dir, "sst2", "dev").select(range(20))
    feats = tokenize_glue(sst, tokenizer, get_task("sst2"), 128, cache_dir=tmp_path)
    assert feats[0]["input_ids"] == tokenizer("it 's a charming and often affecting journey . ")["input_ids"]
    decoded = tokenizer.decode(feats[0]["input_ids"], skip_special_tokens=True)
    assert decoded == "it ' s a charming and often affecting journey."
    assert set(feats[0]["token_type_ids"]) == {0}
    stsb = read_glue_split(data_dir, "stsb", "dev").select(range(5))
    feats = tokenize_glue(stsb, tokenizer, get_task("stsb"), 128, cache_dir=tmp_path)
    assert feats["labels"][:2] == [5.0, 4.75]


def test_tokenize_cache_is_reused(data_dir, tokenizer, tmp_path, monkeypatch):
    spec = get_task("mrpc")
    first = tokenize_glue(read_glue_split(data_dir, "mrpc", "dev"), tokenizer, spec, 64, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.arrow"))
    assert len(files) == 1 and first.cache_files[0]["filename"] == str(files[0])
    mtime = files[0].stat().st_mtime_ns

    def no_map(*args, **kwargs):
        raise AssertionError("tokenised again instead of reusing the cache")

    with monkeypatch.context() as m:
        m.setattr(datasets.Dataset, "map", no_map)
        again = tokenize_glue(read_glue_split(data_dir, "mrpc", "dev"), tokenizer, spec, 64, cache_dir=tmp_path)
    assert again.cache_files[0]["filename"] == str(files[0]) and files[0].stat().st_mtime_ns == mtime
    assert again.to_dict() == first.to_dict()
    # another length, or other rows, is another cache entry
    tokenize_glue(read_glue_split(data_dir, "mrpc", "dev"), tokenizer, spec, 32, cache_dir=tmp_path)
    tokenize_glue(subsample(read_glue_split(data_dir, "mrpc", "dev"), 50, 0), tokenizer, spec, 64, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.arrow"))) == 3


# --------------------------------------------------------------------------------------------------- subsampling

def test_subsample_is_seeded_ordered_and_renumbered(data_dir):
    ds = read_glue_split(data_dir, "cola", "train")
    a, b = subsample(ds, 100, seed=1), subsample(ds, 100, seed=1)
    c = subsample(ds, 100, seed=2)
    assert len(a) == 100 and a.to_dict() == b.to_dict()
    assert a["source_idx"][:] != c["source_idx"][:]
    src = a["source_idx"][:]
    assert src == sorted(src) and len(set(src)) == 100  # original order, no repeats
    assert a["idx"][:] == list(range(100))
    for i in (0, 57, 99):
        assert a[i]["sentence"] == ds[src[i]]["sentence"] and a[i]["label"] == ds[src[i]]["label"]
    assert subsample(ds, None, 0) is ds and subsample(ds, len(ds), 0) is ds and subsample(ds, 10**9, 0) is ds


@pytest.mark.slow
def test_validation_from_train_is_a_seeded_disjoint_split_the_training_set_never_sees(data_dir, tokenizer):
    from cap.data.common import carve

    ds = read_glue_split(data_dir, "cola", "train")
    rest, held = carve(ds, 0.1, seed=3)
    assert len(held) == round(0.1 * len(ds)) and len(rest) + len(held) == len(ds)
    assert set(rest["source_idx"][:]).isdisjoint(held["idx"][:]) and rest["idx"][:] == list(range(len(rest)))
    assert carve(ds, 0.1, seed=3)[1]["idx"][:] == held["idx"][:] != carve(ds, 0.1, seed=4)[1]["idx"][:]
    assert len(carve(ds, 50, seed=3)[1]) == 50  # a count
    for bad in (0.0, len(ds)):
        with pytest.raises(DataError, match="data.validation_from_train"):
            carve(ds, bad, seed=3)

    data = load_task_data("sst2", tokenizer, data_dir=data_dir, eval_splits=["trainval", "validation"],
                          max_train_samples=200, max_eval_samples=40, seed=3, validation_from_train=0.05)
    pool = read_glue_split(data_dir, "sst2", "train")
    rest, held = carve(pool, 0.05, seed=3)
    assert len(data.train) == 200 and len(data.evals["trainval"]) == 40
    assert set(data.eval_examples["trainval"]["sentence"]) <= set(held["sentence"])  # real training rows, labelled
    train = subsample(rest, 200, 3)  # the training subset is drawn from what is left
    assert data.train["labels"][:] == train["label"][:] and set(train["sentence"]).isdisjoint(held["sentence"])
    with pytest.raises(DataError, match="data.validation_from_train"):
        load_task_data("sst2", tokenizer, data_dir=data_dir, eval_splits=["trainval"], max_train_samples=20)


# ---------------------------------------------------------------------------------------------- load_task_data

def test_load_task_data_glue(data_dir, tokenizer, tmp_path):
    data = load_task_data("rte", tokenizer, data_dir=data_dir, max_train_samples=64, max_eval_samples=20,
                          max_seq_length=64, seed=3, cache_dir=tmp_path)
    assert isinstance(data, TaskData) and data.spec is get_task("rte")
    assert len(data.train) == 64 and data.train["idx"][:] == list(range(64))
    assert "labels" in data.train.column_names and "sentence1" not in data.train.column_names
    assert "source_idx" not in data.train.column_names  # only model inputs, labels and idx reach the trainer
    assert list(data.evals) == ["validation"] and len(data.evals["validation"]) == 20
    assert len(data.eval_examples["validation"]) == 20
    again = load_task_data("rte", tokenizer, data_dir=data_dir, max_train_samples=64, max_seq_length=64, seed=3,
                           cache_dir=tmp_path, eval_splits=[])
    assert again.train.to_dict() == data.train.to_dict() and again.evals == {}


def test_load_task_data_mnli_offline_splits(data_dir, tokenizer, tmp_path):
    with pytest.raises(DataError, match="data.eval_split=heldout"):
        load_task_data("mnli", tokenizer, data_dir=data_dir, max_train_samples=8, cache_dir=tmp_path)
    data = load_task_data("mnli", tokenizer, data_dir=data_dir, eval_splits="heldout,sample", max_train_samples=8,
                          max_eval_samples=5, cache_dir=tmp_path)
    assert list(data.evals) == ["heldout", "sample"]
    with pytest.raises(DataError, match="data.train_split=train"):
        load_task_data("mnli", tokenizer, data_dir=data_dir, train_split="dev", eval_splits="heldout",
                       cache_dir=tmp_path)


def test_load_task_data_checks_options(data_dir, tokenizer, tmp_path):
    with pytest.raises(DataError, match="max_train_samples"):
        load_task_data("rte", tokenizer, data_dir=data_dir, max_train_samples=0, cache_dir=tmp_path)
    with pytest.raises(DataError, match="max_seq_length"):
        load_task_data("rte", tokenizer, data_dir=data_dir, max_seq_length=4096, cache_dir=tmp_path)
