"""cap.evaluate on every artifact kind of tiny runs: the metric training reported, the measured sparsity, the
prediction files; the one-line errors (exit status 2)."""
import json
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from helpers import REPO, composed, tiny_overrides

from cap.artifacts import find_artifact, load_model
from cap.evaluate import evaluate, glue_submission, main, save_rows
from cap.recipes import run


def finished_run(run_dir, overrides):
    """A run dir as `python -m cap` leaves it: the recipe's files and Hydra's .hydra/config.yaml."""
    # fp32: in bf16 a batch's padding changes the rounding, and with it a near-random tiny model's spans, so a
    # re-scoring at another eval batch size would not give training's number to 1e-6
    cfg = composed([*overrides, "trainer.precision=fp32"])
    rows = run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return rows


@pytest.fixture(scope="module")
def squad_teacher_run(tmp_path_factory, tiny_model_dir, data_dir):
    run_dir = tmp_path_factory.mktemp("squad-teacher")
    finished_run(run_dir, [*tiny_overrides(tiny_model_dir, "squad"), "method=finetune"])
    return run_dir


def squad_overrides(model_dir, teacher_run, method, *extra):
    return [*tiny_overrides(model_dir, "squad"), f"method={method}", f"teacher.path={teacher_run / 'model'}",
            "contrast.extra_examples=8", *extra]


@pytest.fixture(scope="module")
def cap_f_run(tmp_path_factory, tiny_model_dir, squad_teacher_run):
    from cap.export import main as export

    run_dir = tmp_path_factory.mktemp("cap-f")
    finished_run(run_dir, squad_overrides(tiny_model_dir, squad_teacher_run, "cap_f", "prune.sequence=[0.25,0.5]"))
    export([str(run_dir), "--stage", "0.5"])
    return run_dir


@pytest.fixture(scope="module")
def cap_m_run(tmp_path_factory, tiny_model_dir, squad_teacher_run):
    run_dir = tmp_path_factory.mktemp("cap-m")
    finished_run(run_dir, squad_overrides(tiny_model_dir, squad_teacher_run, "cap_m", "trainer.max_steps=-1",
                                          "trainer.epochs=2", "trainer.warmup=1", "prune.initial_warmup=0",
                                          "prune.final_warmup=1", "prune.final=0.1"))
    return run_dir


def trained_row(run_dir, **key):
    rows = [r for r in json.loads((run_dir / "metrics.json").read_text()) if all(r[k] == v for k, v in key.items())]
    return rows[-1]  # movement: the last epoch, the one saved


def answers(folder):
    """SQuAD answers {id: text} as training wrote them ({split: {...}}) or cap.evaluate --predict does."""
    found = json.loads((folder / "predictions.json").read_text())
    return found.get("validation", found)


def test_a_checkpoint_without_a_run_config_scores_what_training_reported(sst2_teacher_dir, tmp_path):
    (row,) = evaluate(sst2_teacher_dir, ["task=sst2", "data.max_eval_samples=12"], out=tmp_path)
    trained = trained_row(sst2_teacher_dir.parent)
    assert row["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)
    assert (row["kind"], row["task"], row["split"], row["examples"]) == ("checkpoint", "sst2", "validation", 12)
    assert row["sparsity_heads"] == row["sparsity_ffn_neurons"] == row["sparsity"] == 0
    assert 0 < row["nonzero_parameters"] <= row["parameters"] and row["examples_per_s"] > 0
    assert row["latency_ms_per_batch"] > 0 and row["batch_size"] == 128 and row["device"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == [row]


@pytest.mark.slow
def test_a_run_dir_scores_with_its_config_and_writes_predictions_json(squad_teacher_run):
    (row,) = evaluate(squad_teacher_run, ["trainer.eval_batch_size=4"], predict=True)  # default out: <path>/eval
    trained = trained_row(squad_teacher_run)
    assert row["exact_match"] == pytest.approx(trained["exact_match"], abs=1e-6)
    assert row["f1"] == pytest.approx(trained["f1"], abs=1e-6)
    assert (row["kind"], row["method"], row["examples"], row["batch_size"]) == ("checkpoint", "finetune", 12, 4)
    out = squad_teacher_run / "eval"
    assert answers(out / "predictions" / "validation") == answers(squad_teacher_run)  # training's {id: text}
    assert json.loads((out / "metrics.json").read_text())[0]["artifact"] == str(squad_teacher_run / "model")


@pytest.mark.slow
@pytest.mark.parametrize("where, stage, sparsity, kind", [
    ("", None, 0.5, "checkpoint"),          # a run dir: its final model, the last stage's
    ("", "0.25", 0.25, "cap_f_stage"),      # a run dir and --stage
    ("stages/0.5", None, 0.5, "cap_f_stage"),
    ("export/0.5", None, 0.5, "export"),    # heads and neurons removed physically
])
def test_cap_f_artifacts_score_what_their_stage_reported(cap_f_run, where, stage, sparsity, kind, tmp_path):
    (row,) = evaluate(cap_f_run / where, stage=stage, out=tmp_path, predict=True)  # task and data: the run's
    trained = trained_row(cap_f_run, sparsity=sparsity)
    assert row["kind"] == kind and row["method"] == "cap_f" and row["examples"] == 12
    for metric in ("exact_match", "f1"):
        assert row[metric] == pytest.approx(trained[metric], abs=1e-6), metric
    scored = answers(tmp_path / "predictions" / "validation")
    assert scored == answers(cap_f_run / "stages" / f"{sparsity:g}") and len(set(scored.values())) > 6  # varied spans
    # measured from the weights: what the masks said during training
    for key in ("sparsity_heads", "sparsity_ffn_neurons", "sparsity_encoder_params"):
        assert row[key] == pytest.approx(trained[key], abs=1e-6), key
    assert row["sparsity"] == pytest.approx(sparsity, abs=1e-6)  # heads and neurons alike: that share of entries
    dense = sum(p.numel() for p in load_model(find_artifact(cap_f_run / "model")).parameters())
    assert row["parameters"] < dense if kind == "export" else row["parameters"] == dense


@pytest.mark.slow
@pytest.mark.parametrize("where, kind", [("sparse", "sparse"), ("model", "checkpoint")])
def test_movement_artifacts_score_what_the_last_epoch_reported(cap_m_run, where, kind, tmp_path):
    (row,) = evaluate(cap_m_run / where, out=tmp_path, predict=True)
    trained = trained_row(cap_m_run)
    assert (row["kind"], row["method"]) == (kind, "cap_m")
    for metric in ("exact_match", "f1"):
        assert row[metric] == pytest.approx(trained[metric], abs=1e-6), metric
    assert answers(tmp_path / "predictions" / "validation") == answers(cap_m_run)  # the last epoch's answers
    assert row["sparsity"] == row["sparsity_entries"] == pytest.approx(trained["sparsity_entries"], abs=1e-6)
    assert row["sparsity_encoder_params"] == pytest.approx(trained["sparsity_encoder_params"], abs=1e-6)
    assert row["sparsity_heads"] == 0 and row["nonzero_parameters"] < row["parameters"]


def test_glue_predictions_are_the_servers_layout_and_give_the_accuracy(sst2_teacher_dir, data_dir, tmp_path):
    from cap.data import read_glue_split

    (row,) = evaluate(sst2_teacher_dir, ["task=sst2", "data.max_eval_samples=12"], out=tmp_path, predict=True)
    lines = (tmp_path / "predictions" / "validation" / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 13
    pairs = [line.split("\t") for line in lines[1:]]
    assert {p for _, p in pairs} <= {"0", "1"}
    labels = read_glue_split(data_dir, "sst2", "validation")["label"]  # the index is the row of the full dev set
    assert sum(labels[int(i)] == int(p) for i, p in pairs) / 12 == pytest.approx(row["accuracy"], abs=1e-6)


def test_mnli_and_stsb_submission_files(tmp_path):
    from cap.data import get_task

    path = glue_submission(tmp_path, get_task("mnli"), "test_mismatched", [0, 2], [0, 1])
    assert path.name == "MNLI-mm.tsv" and path.read_text() == "index\tprediction\n0\tentailment\n1\tcontradiction\n"
    assert glue_submission(tmp_path, get_task("mnli"), "test_matched", [1], [0]).name == "MNLI-m.tsv"
    stsb = glue_submission(tmp_path, get_task("stsb"), "test", [3.14159], [7])
    assert stsb.name == "STS-B.tsv" and stsb.read_text().splitlines()[1] == "7\t3.142"


def test_an_unlabelled_glue_test_file_gets_predictions_only(sst2_teacher_dir, data_dir, tmp_path):
    from cap.data import read_glue_split

    local = tmp_path / "data" / "glue"
    (local / "SST-2").mkdir(parents=True)
    (local / "SST-2" / "train.tsv.gz").symlink_to(data_dir / "glue" / "SST-2" / "train.tsv.gz")
    sentences = ["a gorgeous , witty film", "dull and lifeless", "it works", "a mess", "fine"]
    (local / "SST-2" / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in
                                                                          enumerate(sentences)))
    (local / "CoLA").mkdir()  # GLUE's CoLA test file has a header, where its train and dev files have none
    (local / "CoLA" / "test.tsv").write_text("index\tsentence\n0\tThe book was read.\n1\tRead book the.\n")
    cola = read_glue_split(tmp_path / "data", "cola", "test")
    assert cola["sentence"] == ["The book was read.", "Read book the."] and cola["label"] == [-1, -1]

    (row,) = evaluate(sst2_teacher_dir, ["task=sst2", f"data.dir={tmp_path / 'data'}", "data.eval_split=test"],
                      out=tmp_path / "out", predict=True)
    assert "accuracy" not in row and row["split"] == "test" and row["examples"] == 5
    lines = (tmp_path / "out" / "predictions" / "test" / "SST-2.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["index", "0", "1", "2", "3", "4"]


def test_metrics_rows_of_the_same_artifact_and_split_are_replaced(tmp_path):
    old = {"artifact": "a", "task": "sst2", "split": "validation", "accuracy": 0.5}
    other = {**old, "artifact": "b"}
    save_rows(tmp_path / "metrics.json", [old, other])
    save_rows(tmp_path / "metrics.json", [{**old, "accuracy": 0.7}, {**old, "split": "test"}])
    assert [r.get("accuracy") for r in json.loads((tmp_path / "metrics.json").read_text())] == [0.7, 0.5, 0.5]


def one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_what_cannot_be_scored_is_one_line_and_exit_status_2(sst2_teacher_dir, cap_f_run, tmp_path, capsys):
    assert "/etc is not a model: it holds" in one_error_line(capsys, ["/etc"])
    teacher = str(sst2_teacher_dir)
    out = ["--out", str(tmp_path)]
    assert "predicts 2 labels but task mnli has 3" in one_error_line(capsys, [teacher, "task=mnli", *out])
    assert "task squad needs a question-answering model" in one_error_line(capsys, [teacher, "task=squad", *out])
    assert ("is a question-answering model (BertForQuestionAnswering) but task sst2 needs a sequence-classification"
            in one_error_line(capsys, [str(cap_f_run / "stages" / "0.5"), "task=sst2", *out]))
    assert ("predicts the labels negative, positive but task cola has unacceptable, acceptable"
            in one_error_line(capsys, [teacher, "task=cola", *out]))
    assert "no run config" in one_error_line(capsys, [teacher, *out])
    assert "trainer.lrr: no such key" in one_error_line(capsys, [teacher, "task=sst2", "trainer.lrr=1", *out])
    bare = tmp_path / "bare"  # weights without their tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(sst2_teacher_dir / name, bare / name)
    assert f"{bare} has no tokenizer" in one_error_line(capsys, [str(bare), "task=sst2", *out])
    assert ("has no finished stage 0.7; finished stages: 0.25, 0.5"
            in one_error_line(capsys, [str(cap_f_run), "--stage", "0.7"]))
    assert "--stage 0.5 picks a stage of a run dir" in one_error_line(capsys, [teacher, "--stage", "0.5"])
    assert not (tmp_path / "metrics.json").exists()


def test_the_command_line_says_it_in_one_line_without_a_traceback():
    done = subprocess.run([sys.executable, "-m", "cap.evaluate", "/etc"], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: /etc is not a model") and len(done.stderr.splitlines()) == 1
