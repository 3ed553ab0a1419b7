"""The command line: Hydra composition, every task end to end on a tiny model, bad input, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cap.errors import UserError
from cap.io import last_complete_checkpoint
from cap.recipes import run

from helpers import OFFLINE_EVAL, REPO, composed, tiny_overrides

TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "squad"]
METRICS = {
    "cola": {"matthews_correlation"}, "sst2": {"accuracy"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"},
    "stsb": {"pearson", "spearmanr"}, "mnli": {"accuracy"}, "qnli": {"accuracy"}, "rte": {"accuracy"},
    "wnli": {"accuracy"}, "squad": {"exact_match", "f1"},
}


def cli(*args, timeout=300, **kwargs):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "cap", *args], cwd=kwargs.pop("cwd", REPO), env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.slow
def test_help_lists_the_config_groups():
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    for group in ("task:", "model:", "method:", "trainer:", "logger:"):
        assert group in out.stdout
    assert "sst2" in out.stdout and "squad" in out.stdout
    assert "trainer.batch_size=32" in out.stdout  # and the keys (tests/test_config.py)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_composes(task):
    cfg = composed([f"task={task}"])
    assert cfg.task.name == task and cfg.method.name == "finetune"


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_finetune_every_task_on_a_slice(task, data_dir, tiny_model_dir, tmp_path):
    rows = run(composed(tiny_overrides(tiny_model_dir, task)), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == rows
    expected_split = OFFLINE_EVAL.get(task, "validation")
    for row in rows:
        assert METRICS[task] <= set(row), row
        assert row["split"] == expected_split and row["step"] == 2
    assert (tmp_path / "model" / "config.json").exists()
    if task == "squad":
        predictions = json.loads((tmp_path / "predictions.json").read_text())
        assert len(predictions["validation"]) == 12


def test_unknown_task_is_a_one_line_error(tmp_path):
    out = cli("task=nope", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith("error: task=nope: no such option; choose one of cola, ") and "sst2" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_input_errors_leave_no_run_dir(data_dir, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = cli("task=mnli", f"model.name_or_path={tiny_model_dir}", f"hydra.run.dir={run_dir}")
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and "heldout" in out.stderr  # says which split exists
    assert not run_dir.exists()
    out = cli("model.name_or_path=/no/such/model", f"hydra.run.dir={run_dir}")
    assert out.returncode == 2 and "model.name_or_path" in out.stderr and not run_dir.exists()


@pytest.mark.slow
def test_a_refused_run_leaves_no_empty_folders_behind(data_dir, tmp_path):
    """runs/<task>/<method>/ made for the refused run go with it (cwd: an empty folder)."""
    out = cli("method=cap_m", "trainer.epochs=2", f"data.dir={data_dir}", cwd=tmp_path)  # the paper's W: no fit
    assert out.returncode == 2 and "does not fit the run" in out.stderr
    assert not list(tmp_path.iterdir())


def test_missing_data_dir_split_and_kd_without_teacher(data_dir, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="teacher.path"):
        run(composed(tiny_overrides(tiny_model_dir, "rte") + ["kd.weight=0.5"]), tmp_path)


@pytest.mark.slow
def test_resume_after_kill(data_dir, tiny_model_dir, tmp_path):
    """SIGKILL a run once it has written a checkpoint; started again, it resumes from there and finishes."""
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(tiny_model_dir, "rte"), "trainer.max_steps=400", "trainer.save_steps=2",
            "data.max_train_samples=64", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "cap", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before writing a checkpoint"
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    saved = int(last_complete_checkpoint(run_dir / "checkpoints").split("-")[-1])
    out = cli(*args[:-1], f"trainer.max_steps={saved + 2}", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming from {run_dir}/checkpoints/checkpoint-" in out.stdout
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert rows[0]["step"] == saved + 2
