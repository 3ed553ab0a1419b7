"""Hostile input: malformed data files, impossible configs, models that do not fit the method, over-long texts.

Each bad input must end in one UserError that says what is wrong, where (file and line, or the config key) and what
to do, before any training starts and without leaving a run dir (or a cached teacher) behind. Over-long texts are no
error: they are truncated. The data lives in a tmp dir laid out like ../shared/data, built from a few real rows."""
import ast
import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from helpers import REPO, composed, tiny_overrides

from cap.checks import validate
from cap.errors import UserError
from cap.recipes import run
from cap.recipes.common import prepare
from cap.trainer import CAPTrainer

TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "squad"]
METHODS = ["finetune", "cap_f", "cap_m", "cap_soft"]
FOLDERS = {"sst2": "glue/SST-2", "rte": "glue/RTE", "squad": "squad"}
LONG = "a long , winding sentence that never ends " * 240  # 10,080 characters


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Every refusal must come before training: reaching Trainer.train fails the test at once."""
    def train(self, *args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(CAPTrainer, "train", train)


# ------------------------------------------------------------------------------------------------ data and models

def squad_doc(paragraphs) -> dict:
    """SQuAD v1.1 JSON from [(context, [(id, question, answer text, answer_start), ...]), ...]."""
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": ctx, "qas": [{"id": qid, "question": q, "answers": [{"text": t, "answer_start": s}]}
                                 for qid, q, t, s in qas]} for ctx, qas in paragraphs]}]}


@pytest.fixture(scope="module")
def good_files(data_dir) -> dict[str, dict[str, bytes]]:
    """task -> {file name: bytes}: the first real rows of SST-2 and RTE dev, the first SQuAD dev paragraph."""
    def head(rel, n):
        return b"".join(gzip.open(data_dir / rel).readlines()[:n])

    squad = json.loads(gzip.decompress((data_dir / "squad" / "dev-v1.1.json.gz").read_bytes()))
    paragraph = squad["data"][0]["paragraphs"][0]
    squad_bytes = json.dumps({"version": "1.1", "data": [{"title": "Super_Bowl_50", "paragraphs": [
        {"context": paragraph["context"], "qas": paragraph["qas"][:4]}]}]}).encode()
    return {
        "sst2": {"train.tsv.gz": head("glue/SST-2/dev.tsv.gz", 9), "dev.tsv.gz": head("glue/SST-2/dev.tsv.gz", 9)},
        "rte": {"train.tsv.gz": head("glue/RTE/dev.tsv.gz", 7), "dev.tsv.gz": head("glue/RTE/dev.tsv.gz", 7)},
        "squad": {"train-v1.1.json.gz": squad_bytes, "dev-v1.1.json.gz": squad_bytes},
    }


def write_data(root: Path, good: dict, task: str, files: dict) -> Path:
    """`root` laid out like ../shared/data: the task's good files, then `files` ({name: str, bytes, a JSON object
    or None to delete}), each replacing every file of its split (`train.tsv` replaces `train.tsv.gz`)."""
    folder = root / FOLDERS[task]
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in {**good[task], **files}.items():
        stem = name.split(".")[0] + "."
        for old in folder.glob(stem + "*"):
            old.unlink()
        if content is None:
            continue
        if isinstance(content, (dict, list)):
            content = json.dumps(content)
        data = content.encode("utf-8") if isinstance(content, str) else content
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, minilm_path) -> dict[str, Path]:
    """Tiny checkpoints: `bert` (no head), teachers with 2 or 3 labels or twice the width, DistilBERT and GPT-2."""
    import torch
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, GPT2Config, GPT2Model)

    torch.manual_seed(0)
    small = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    built = {
        "teacher": BertForSequenceClassification(BertConfig(**small, num_labels=2)),
        "teacher-3-labels": BertForSequenceClassification(BertConfig(**small, num_labels=3)),
        "teacher-wide": BertForSequenceClassification(BertConfig(**{**small, "hidden_size": 64}, num_labels=2)),
        "distilbert": DistilBertForSequenceClassification(DistilBertConfig(vocab_size=30522, dim=32, n_layers=2,
                                                                           n_heads=4, hidden_dim=64)),
        "gpt2": GPT2Model(GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=0)),
    }
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    root = tmp_path_factory.mktemp("hostile-models")
    paths = {"bert": tiny_model_dir}
    for name, model in built.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def overrides(models, task, root, tmp_path, method="finetune", model="bert", teacher="teacher", extra=()):
    """A tiny run of `method` on the data in `root`; pruning methods get the tiny teacher unless teacher=None."""
    out = [*tiny_overrides(models[model], task), f"method={method}", f"data.dir={root}",
           f"data.cache_dir={tmp_path / 'cache'}", f"teacher.cache_dir={tmp_path / 'teachers'}"]
    if method != "finetune" and teacher:
        out.append(f"teacher.path={models[teacher]}")
    if method in ("cap_m", "cap_soft"):  # a schedule that fits 2 updates: what is refused is refused for itself
        out += ["trainer.warmup=1", "prune.initial_warmup=0", "prune.final_warmup=0"]
    return [*out, *extra]


def assert_refused(cfg, tmp_path, parts) -> str:
    """run() raises a one-line UserError containing every one of `parts`, and leaves no run dir or teacher."""
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        run(cfg, run_dir)
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    assert not run_dir.exists() or not any(run_dir.iterdir())
    assert not (tmp_path / "teachers").exists()  # no teacher was fine-tuned (or begun) on the way
    return message


# ------------------------------------------------------------------------------------------------- bad data files

SQUAD_NOT_IN_CONTEXT = squad_doc([("Paris is the capital of France.", [
    ("fine-1", "Capital?", "Paris", 0), ("hostile-1", "Capital of Germany?", "Berlin", 0)])])


@pytest.mark.parametrize("task,files,extra,parts", [
    pytest.param("sst2", {"train.tsv": b""}, [], ["train.tsv is empty", "replace it"], id="empty-file"),
    pytest.param("sst2", {"train.tsv.gz": b""}, [], ["train.tsv.gz is empty"], id="empty-gzip"),
    pytest.param("sst2", {"dev.tsv": b"\x1f\x8b\x08\x00 cut short"}, [], ["dev.tsv", "cannot read it", "good copy"],
                 id="broken-gzip"),
    pytest.param("sst2", {"train.tsv": "text\tpolarity\nfine\t1\n"}, [],
                 ["train.tsv, line 1", "no column 'sentence', 'label'", "found text, polarity"], id="wrong-header"),
    pytest.param("sst2", {"dev.tsv.gz": "sentence\tlabel\nfine\t1\ntoo\tmany\t1\n"}, [],
                 ["dev.tsv.gz, line 3", "3 tab-separated columns, expected 2", "fix or remove"],
                 id="wrong-column-count"),
    pytest.param("sst2", {"train.jsonl": '{"text": "fine", "label": 1}\n'}, [],
                 ["train.jsonl, line 1", "no 'sentence' field"], id="jsonl-wrong-columns"),
    pytest.param("sst2", {"train.tsv.gz": b"sentence\tlabel\nfine\t1\nalso fine\t0\nbad \xff\xfe bytes\t1\n"}, [],
                 ["train.tsv.gz, line 4", "not UTF-8", "re-encode"], id="non-utf8"),
    pytest.param("sst2", {"train.tsv": "sentence\tlabel\nfine\t1\nodd\t2\n"}, [],
                 ["train.tsv, line 3", "label '2'", "0 (negative), 1 (positive)"], id="label-outside-set"),
    pytest.param("rte", {"dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n"}, [],
                 ["dev.tsv, line 2", "label 'maybe'", "entailment, not_entailment"], id="label-name-outside-set"),
    pytest.param("sst2", {"train.tsv.gz": None}, [], ["no split 'train'", "splits present: dev"],
                 id="missing-train-file"),
    pytest.param("sst2", {}, ["data.eval_split=test"], ["no split 'test'", "use data.eval_split=dev"],
                 id="missing-eval-file"),
    pytest.param("sst2", {}, ["task.name=rte"], ["no folder", "glue/RTE", "CAP_DATA_DIR"], id="missing-task-folder"),
    pytest.param("squad", {"dev-v1.1.json": SQUAD_NOT_IN_CONTEXT}, [],
                 ["dev-v1.1.json", "'Berlin'", "'hostile-1'", "does not occur in its context", "fix or remove"],
                 id="squad-answer-not-in-context"),
    pytest.param("squad", {"train-v1.1.json.gz": {"version": "1.1", "articles": []}}, [],
                 ["train-v1.1.json.gz is not a SQuAD file", '{"data": [{"title"'], id="squad-wrong-layout"),
    pytest.param("squad", {"dev-v1.1.json": '{"data": [\n{"title": '}, [],
                 ["dev-v1.1.json: not valid JSON (line 2"], id="squad-broken-json"),
    pytest.param("squad", {"dev-v1.1.json.gz": b'{"data": []}\n\n\xc3('}, [],
                 ["dev-v1.1.json.gz, line 3", "not UTF-8"], id="squad-non-utf8"),
])
def test_bad_data_is_refused_with_file_and_line(good_files, models, tmp_path, task, files, extra, parts):
    root = write_data(tmp_path / "data", good_files, task, files)
    assert_refused(composed(overrides(models, task, root, tmp_path, extra=extra)), tmp_path, parts)


# -------------------------------------------------------------------------------------------- impossible configs
# (values of the wrong type, `contrast.extra_examples=lots`, fail earlier, while composing: tests/test_config.py)

@pytest.mark.parametrize("method,extra,parts", [
    pytest.param("finetune", ["task.name=nope"], ["unknown task 'nope'", "sst2", "task=<name>"], id="unknown-task"),
    pytest.param("finetune", ["method.name=magic"], ["unknown method 'magic'", "cap_f"], id="unknown-method"),
    pytest.param("cap_f", ["prune.sequence=[0.5,1.0]"], ["prune.sequence"], id="cap_f-sparsity-1"),
    pytest.param("cap_f", ["prune.sequence=[-0.1,0.2]"], ["prune.sequence"], id="cap_f-negative-sparsity"),
    pytest.param("cap_f", ["prune.sequence=[0.2,0.5,0.3]"], ["prune.sequence", "increasing"], id="cap_f-decreasing"),
    pytest.param("cap_f", ["prune.sequence=[0.3,0.3]"], ["prune.sequence", "increasing"], id="cap_f-repeated"),
    pytest.param("cap_m", ["prune.final=0"], ["prune.final=0"], id="cap_m-keeps-nothing"),  # sparsity 1
    pytest.param("cap_m", ["prune.final=1.5"], ["prune.final=1.5"], id="cap_m-keeps-more-than-all"),  # < 0
    pytest.param("cap_soft", ["prune.final=1.0"], ["prune.final=1.0"], id="cap_soft-threshold-1"),
    pytest.param("cap_soft", ["prune.target_sparsity=1.0"], ["prune.target_sparsity"], id="cap_soft-target-1"),
    pytest.param("cap_soft", ["prune.target_sparsity=-0.1"], ["prune.target_sparsity"], id="cap_soft-target-negative"),
    pytest.param("cap_f", ["contrast.extra_examples=-1"], ["contrast.extra_examples=-1", "an integer >= 0"],
                 id="negative-extra-examples"),
    pytest.param("cap_m", ["contrast.temperature=0"], ["contrast.temperature=0", "> 0"], id="zero-temperature"),
    pytest.param("cap_f", ["contrast.sup_weight=-3"], ["contrast.sup_weight=-3", ">= 0"], id="negative-weight"),
    pytest.param("cap_f", ["contrast.normalization=mean"], ["contrast.normalization=mean", "original, per_anchor"],
                 id="unknown-normalization"),
    pytest.param("cap_soft", ["contrast.pooling=max"], ["contrast.pooling=max", "cls, mean"], id="unknown-pooling"),
    pytest.param("cap_soft", ["contrast.reaches=head"], ["contrast.reaches=head", "both, weights, scores"],
                 id="unknown-reaches"),
    pytest.param("cap_f", ["contrast.reaches=weights"], ["contrast.reaches=weights", "method=cap_m or cap_soft"],
                 id="reaches-without-scores"),
    pytest.param("finetune", ["data.max_seq_length=0"], ["data.max_seq_length=0", "an integer >= 1"],
                 id="zero-max-seq-length"),
    pytest.param("finetune", ["trainer.precision=fp64"], ["trainer.precision=fp64", "auto, fp32, bf16, fp16"],
                 id="unknown-precision"),
    pytest.param("cap_m", ["trainer.warmup=1.5"], ["trainer.warmup=1.5", "a whole number of updates"],
                 id="fractional-warmup-over-1"),
    pytest.param("cap_f", ["logger.name=tensorboard"], ["logger.name=tensorboard", "none, wandb"],
                 id="unknown-logger"),
])
def test_impossible_configs_are_refused_with_the_key(good_files, models, tmp_path, method, extra, parts):
    root = write_data(tmp_path / "data", good_files, "sst2", {})
    assert_refused(composed(overrides(models, "sst2", root, tmp_path, method, extra=extra)), tmp_path, parts)


@pytest.mark.parametrize("method,model,teacher,parts", [
    pytest.param("cap_f", "bert", "teacher-3-labels",
                 ["teacher.path=", "predicts 3 labels but task sst2 has 2", "fine-tuned on this task"],
                 id="teacher-label-count"),
    pytest.param("cap_m", "bert", "bert", ["teacher.path=", "no trained weights for classifier"],
                 id="teacher-without-head"),
    pytest.param("cap_soft", "bert", "teacher-wide", ["hidden size 64", "student 32", "contrast.fic=false"],
                 id="teacher-of-another-width"),
    pytest.param("finetune", "teacher-3-labels", None, ["model.name_or_path=", "head of another size",
                                                        "pre-trained checkpoint"], id="student-head-of-another-task"),
    # no teacher.path: a teacher would be fine-tuned first, so the model check must come before that
    pytest.param("cap_f", "distilbert", None, ["method=cap_f cannot prune", "DistilBertForSequenceClassification",
                                               "heads and FFN neurons", "method=finetune"], id="cap_f-distilbert"),
    pytest.param("cap_m", "distilbert", None, ["method=cap_m cannot prune", "BERT-family"], id="cap_m-distilbert"),
    pytest.param("cap_soft", "gpt2", None, ["method=cap_soft cannot prune", "GPT2ForSequenceClassification"],
                 id="cap_soft-gpt2"),
])
def test_models_that_do_not_fit_are_refused(good_files, models, tmp_path, method, model, teacher, parts):
    root = write_data(tmp_path / "data", good_files, "sst2", {})
    cfg = composed(overrides(models, "sst2", root, tmp_path, method, model=model, teacher=teacher))
    assert_refused(cfg, tmp_path, parts)


def test_shipped_configs_pass_every_check():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        choices = [[f"task={task}"] for task in TASKS] + [["experiment=quickstart"]]
        # the bare movement methods keep QQP's W (11,000 updates), which SST-2's run cannot fit: refused before
        # anything runs (tests/test_movement.py); the presets set theirs
        choices += [[f"task={task}", f"method={method}", *(["trainer.warmup=0.1"] if method != "cap_f" else [])]
                    for task in ("sst2", "squad") for method in METHODS[1:]]
        configs = [compose("config", overrides) for overrides in choices]
    for cfg in configs:
        validate(cfg)  # the methods' own keys included (cap.checks)


# ------------------------------------------------------------------------------- long texts load, truncated

def test_long_glue_texts_are_truncated(good_files, models, tmp_path):
    rows = "sentence\tlabel\n" + f"{LONG}\t1\n" + "x" * 10_000 + "\t0\nshort\t1\n"
    pairs = "index\tsentence1\tsentence2\tlabel\n" + f"0\t{LONG}\tshort\tentailment\n1\ta\t{LONG}\tnot_entailment\n"
    for task, files in (("sst2", {"train.tsv.gz": rows}), ("rte", {"dev.tsv": pairs})):
        root = write_data(tmp_path / "data", good_files, task, files)
        setup = prepare(composed(overrides(models, task, root, tmp_path)))
        lengths = {split: [len(ids) for ids in ds["input_ids"]]
                   for split, ds in {"train": setup.data.train, **setup.data.evals}.items()}
        assert max(max(v) for v in lengths.values()) == 128  # cut at data.max_seq_length, not an error
        if task == "sst2":
            assert lengths["train"][:3] == [128, 3, 3]  # no spaces: one over-long word is one [UNK]
        else:
            assert lengths["validation"][:2] == [128, 128]


def test_long_squad_context_and_question_are_windowed(good_files, models, tmp_path):
    context = LONG + "The treasure lies under the old oak tree."
    answer = "under the old oak tree"
    doc = squad_doc([(context, [("long-context", "Where does the treasure lie?", answer, context.index(answer)),
                                ("long-question", "why " * 2500 + "?", "winding", LONG.index("winding"))])])
    root = write_data(tmp_path / "data", good_files, "squad", {"train-v1.1.json": doc, "dev-v1.1.json": doc})
    setup = prepare(composed(overrides(models, "squad", root, tmp_path)))
    train, tokenizer = setup.data.train, setup.tokenizer
    assert len(train) > 2 * 20  # ~2,000 context tokens in windows of < 128: dozens of features
    assert max(len(ids) for ids in train["input_ids"]) <= 128
    found = [tokenizer.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1])
             for f in train if f["start_positions"] > 0]
    assert answer in found
    assert len(setup.data.evals["validation"]) == len(train)


def test_misplaced_squad_answer_start_is_moved_and_reported(good_files, models, tmp_path, caplog):
    context = "red blue red green red"
    doc = squad_doc([(context, [("a", "Which colour?", "green", 3), ("b", "Which colour?", "red", 8)])])
    root = write_data(tmp_path / "data", good_files, "squad", {"dev-v1.1.json": doc})
    with caplog.at_level(logging.WARNING, logger="cap.data.squad"):
        setup = prepare(composed(overrides(models, "squad", root, tmp_path)))
    assert [a["answer_start"] for a in setup.data.eval_examples["validation"]["answers"]] == [[13], [9]]
    assert "dev-v1.1.json: 2 answer_start offsets" in caplog.text and "'a'" in caplog.text


# ------------------------------------------------------------------------------------------ the command line

def cli(*args):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "cap", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["label-outside-set", "cap_m-distilbert"])
def test_cli_prints_one_error_line_and_leaves_no_run_dir(good_files, models, tmp_path, case):
    if case == "label-outside-set":
        root = write_data(tmp_path / "data", good_files, "sst2", {"train.tsv": "sentence\tlabel\nfine\t1\nodd\t2\n"})
        args, parts = overrides(models, "sst2", root, tmp_path), ["train.tsv, line 3", "label '2'"]
    else:
        root = write_data(tmp_path / "data", good_files, "sst2", {})
        args = overrides(models, "sst2", root, tmp_path, "cap_m", model="distilbert", teacher=None)
        parts = ["method=cap_m cannot prune"]
    run_dir = tmp_path / "run"
    out = cli(*args, f"hydra.run.dir={run_dir}")
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: ")
    for part in parts:
        assert part in line
    assert not run_dir.exists() and not (tmp_path / "teachers").exists()


# ------------------------------------------------------------------------------------------- safe checkpoints

def test_no_pickle_based_loading_in_the_code():
    """Checkpoints are read as safetensors; a torch.load must say weights_only=True, pickle is not used at all."""
    unsafe = []
    for path in sorted([*(REPO / "cap").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                unsafe += [f"{where} imports {n}" for n in names if n.split(".")[0] in ("pickle", "dill", "joblib")]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if owner == "torch" and flags.get("weights_only") is not True:
                    unsafe.append(f"{where} torch.load without weights_only=True")
                if owner in ("np", "numpy") and flags.get("allow_pickle"):
                    unsafe.append(f"{where} np.load with allow_pickle")
    assert not unsafe, unsafe
