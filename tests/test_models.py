"""cap.models: task models carry their labels' names; a new task head is said in one line, anything else the
library reports still shows."""
import json
import logging

import pytest
from safetensors.torch import load_file, save_file

from cap.data import get_task, read_glue_split
from cap.models import build_model


@pytest.fixture
def library_log():
    """The messages transformers logs (its own handler writes to the stderr of the session's start, out of capfd's
    reach)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_a_saved_model_names_its_labels(sst2_teacher_dir):
    config = json.loads((sst2_teacher_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}


@pytest.mark.parametrize("task,row,name", [
    ("sst2", 0, "positive"),        # "it 's a charming and often affecting journey ."
    ("wnli", 0, "not_entailment"),  # "The drain is clogged with hair. It has to be cleaned." -/-> "The hair ..."
    ("rte", 0, None),               # labels written as names in the TSV
    ("mrpc", 0, "equivalent"),
])
def test_label_ids_of_the_data_are_the_names_of_the_model(tiny_model_dir, data_dir, task, row, name):
    import gzip

    model = build_model(str(tiny_model_dir), get_task(task))
    label = read_glue_split(data_dir, task, "dev")[row]["label"]
    if name is None:  # the name GLUE's file gives
        folder = {"rte": "RTE"}[task]
        header, first = gzip.open(data_dir / "glue" / folder / "dev.tsv.gz", "rt").read().splitlines()[:2]
        name = first.split("\t")[header.split("\t").index("label")]
    assert model.config.id2label[label] == name and model.config.label2id[name] == label


@pytest.mark.parametrize("task", ["stsb", "squad"])
def test_regression_and_qa_have_no_label_names(tiny_model_dir, task):
    model = build_model(str(tiny_model_dir), get_task(task))
    assert all(name.startswith("LABEL_") for name in model.config.id2label.values())  # the library's placeholders


@pytest.mark.parametrize("task,head", [("sst2", "classifier"), ("squad", "qa_outputs")])
def test_a_new_head_is_said_in_one_line_without_the_library_table(tiny_model_dir, capfd, library_log, task, head):
    build_model(str(tiny_model_dir), get_task(task))
    out, _ = capfd.readouterr()
    assert out == (f"model: {tiny_model_dir} + a new {task} head ({head}.weight, {head}.bias initialised "
                   "randomly)\n")
    assert not any("LOAD REPORT" in m for m in library_log)  # also not for the QA model's unused pooler


def test_weights_missing_from_the_encoder_are_still_reported(tiny_model_dir, tmp_path, capfd, library_log):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["encoder.layer.0.attention.self.query.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    build_model(str(broken), get_task("sst2"))
    (report,) = [m for m in library_log if "LOAD REPORT" in m]
    assert "bert.encoder.layer.0.attention.self.query.weight" in report and "MISSING" in report
    assert "a new sst2 head" not in capfd.readouterr().out


def test_pooling_auto_reads_the_checkpoints_sentence_transformers_pooling(tiny_model_dir, tmp_path):
    import json
    import shutil

    from cap.models import resolve_pooling, sentence_pooling

    assert sentence_pooling("minilm") == "mean"  # all-MiniLM-L6-v2 was trained as a mean-pooling embedder
    assert resolve_pooling("auto", "minilm") == "mean" and resolve_pooling("cls", "minilm") == "cls"
    assert sentence_pooling(str(tiny_model_dir)) is None and resolve_pooling("auto", str(tiny_model_dir)) == "cls"
    cls_model = tmp_path / "cls-model"
    shutil.copytree(tiny_model_dir, cls_model)
    (cls_model / "modules.json").write_text(json.dumps([{"idx": 1, "path": "1_Pooling",
                                                         "type": "sentence_transformers.models.Pooling"}]))
    (cls_model / "1_Pooling").mkdir()
    (cls_model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert resolve_pooling("auto", str(cls_model)) == "cls" == sentence_pooling(str(cls_model))
    (cls_model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert sentence_pooling(str(cls_model)) is None  # no tap for max pooling: the paper's pooler output
