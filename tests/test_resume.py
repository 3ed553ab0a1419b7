"""Stay up: a run killed (SIGKILL) at any phase and started again with the same command ends with the masks and
metrics of an uninterrupted run; a damaged file is reported and skipped, never used.

The kills go through `cap.io.crash_point`: `CAP_KILL_AT=<point>[:<n>]` makes the run kill itself the n-th time it
reaches a named point. Each chain below kills the same run dir at one phase after another, every attempt resuming
from what the one before left, then lets the last attempt finish."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO, composed, tiny_overrides

from cap.io import append_metrics, file_problem, last_complete_checkpoint, publish_dir, read_json
from cap.recipes import run

# 16 examples, batch 8: 2 updates per epoch, a checkpoint after each epoch (save_total_limit=2 keeps the last two)
CAP_F = ["method=cap_f", "trainer.max_steps=-1", "prune.retrain_epochs=2", "prune.sequence=[0.25,0.5]",
         "prune.importance_fraction=0.5", "contrast.extra_examples=8"]
# SnC snapshots with dropout (the original's CAP-m, spec Q7): a resumed epoch must draw the same dropout masks
CAP_M = ["method=cap_m", "trainer.max_steps=-1", "trainer.epochs=3", "trainer.warmup=1", "prune.initial_warmup=1",
         "prune.final_warmup=1", "prune.final=0.3", "contrast.extra_examples=8", "bank.snapshot_train_mode=true"]


def overrides(model_dir, teacher_dir, method):
    return [*tiny_overrides(model_dir, "sst2"), f"teacher.path={teacher_dir}", *method]


def cli(args, run_dir, kill_at=None):
    """`python -m cap <args>` in `run_dir`; with `kill_at`, the run must die there, by SIGKILL."""
    env = {k: v for k, v in os.environ.items() if k != "CAP_KILL_AT"}
    if kill_at:
        env["CAP_KILL_AT"] = kill_at
    out = subprocess.run([sys.executable, "-m", "cap", *args, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    if kill_at:
        assert out.returncode == -signal.SIGKILL and f"CAP_KILL_AT={kill_at}:" in out.stdout, \
            f"{kill_at} was not reached (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    else:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def assert_same_cap_f(run_dir, reference):
    assert read_json(run_dir / "metrics.json") == read_json(reference / "metrics.json")
    stages = sorted(p.name for p in (reference / "stages").iterdir())
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == stages
    for stage in stages:
        assert (run_dir / "stages" / stage / "DONE").exists()
        masks = load_file(str(run_dir / "stages" / stage / "masks.safetensors"))
        expected = load_file(str(reference / "stages" / stage / "masks.safetensors"))
        for name in ("head_mask", "ffn_mask"):
            assert torch.equal(masks[name], expected[name]), (stage, name)
    # and retraining resumed exactly: the last stage's weights, folded and zeroed, are the same to the bit
    for name in ("model/model.safetensors", "masked_weights.safetensors"):
        weights = load_file(str(run_dir / "stages" / stages[-1] / name))
        expected = load_file(str(reference / "stages" / stages[-1] / name))
        assert weights.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(weights[key], tensor), (name, key)
    assert (run_dir / "model" / "model.safetensors").read_bytes() == \
        (run_dir / "stages" / stages[-1] / "model" / "model.safetensors").read_bytes()


def assert_same_cap_m(run_dir, reference):
    assert read_json(run_dir / "metrics.json") == read_json(reference / "metrics.json")
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    expected = load_file(str(reference / "model" / "model.safetensors"))
    matrices = [k for k, t in expected.items() if ".encoder." in k and t.dim() == 2]
    assert matrices
    for name in matrices:
        assert torch.equal(weights[name] == 0, expected[name] == 0), name
    for name, tensor in expected.items():  # and training resumed exactly: the same weights to the bit
        assert torch.equal(weights[name], tensor), name
    assert (run_dir / "sparse" / "sparse.safetensors").exists()


@pytest.fixture(scope="module")
def cap_f_args(tiny_model_dir, sst2_teacher_dir):
    return overrides(tiny_model_dir, sst2_teacher_dir, CAP_F)


@pytest.fixture(scope="module")
def cap_m_args(tiny_model_dir, sst2_teacher_dir):
    return overrides(tiny_model_dir, sst2_teacher_dir, CAP_M)


@pytest.fixture(scope="module")
def cap_f_reference(tmp_path_factory, cap_f_args):
    """An uninterrupted run that keeps its checkpoints (the damaged-file test resumes from them)."""
    run_dir = tmp_path_factory.mktemp("cap-f-reference")
    cli([*cap_f_args, "trainer.keep_checkpoints=true"], run_dir)
    return run_dir


@pytest.fixture(scope="module")
def cap_m_reference(tmp_path_factory, cap_m_args):
    """An uninterrupted run that keeps its checkpoints (the damaged-file test resumes from them)."""
    run_dir = tmp_path_factory.mktemp("cap-m-reference")
    cli([*cap_m_args, "trainer.keep_checkpoints=true"], run_dir)
    return run_dir


@pytest.mark.slow
def test_cap_f_killed_at_every_phase_ends_as_an_uninterrupted_run(cap_f_args, cap_f_reference, tmp_path):
    run_dir = tmp_path / "run"
    s0, s1 = run_dir / "stages" / "0.25", run_dir / "stages" / "0.5"
    # (kill point in this attempt, what it left on disk): each attempt resumes from the one before
    chain = [
        # FiC encoded; stage 0.25 chosen, PrC encoded; its first epoch retrained and checkpointed, the second not
        ("checkpoint_saved", lambda: last_complete_checkpoint(s0 / "checkpoints").endswith("checkpoint-2")
         and not (s0 / "DONE").exists()),
        # stage 0.25 resumed from checkpoint-2 and finished; its checkpoints renamed aside, not yet deleted
        ("removing_checkpoints", lambda: (s0 / "DONE").exists() and not (s0 / "checkpoints").exists()
         and (s0 / ".checkpoints.deleted" / "checkpoint-4").exists()),
        # the deletion finished; stage 0.5's importance computed, nothing of it saved
        ("importance_done", lambda: not list(s0.glob("*checkpoints*")) and not (s1 / "selected").exists()),
        ("selected_saved", lambda: (s1 / "selected" / "snc.safetensors").exists()
         and last_complete_checkpoint(s1 / "checkpoints") is None),
        # stage 0.5 retrained, its model, masks and metrics row written, its DONE marker not
        ("stage_saved", lambda: (s1 / "masks.safetensors").exists() and not (s1 / "DONE").exists()
         and len(read_json(run_dir / "metrics.json")) == 2),
        # every stage done, the run's model published: the last attempt has nothing left to do
        ("model_published", lambda: (s1 / "DONE").exists() and (run_dir / "model" / "config.json").exists()),
    ]
    for kill_at, left in chain:
        cli(cap_f_args, run_dir, kill_at)
        assert left(), f"unexpected state after the kill at {kill_at}"
    assert f"already finished: {run_dir}" in cli(cap_f_args, run_dir).stdout
    assert_same_cap_f(run_dir, cap_f_reference)
    assert not list(run_dir.glob("stages/*/*checkpoints*"))


@pytest.mark.slow
def test_cap_m_killed_at_every_phase_ends_as_an_uninterrupted_run(cap_m_args, cap_m_reference, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    snc = run_dir / "banks" / "snc.safetensors"
    chain = [
        # bank_encoded: 1 FiC, 2 PrC (start of epoch 0), 3 the first SnC snapshot (start of epoch 1)
        ("bank_encoded:3", lambda: load_file(str(snc))["vectors"].shape[1] == 1
         and last_complete_checkpoint(ckpts).endswith("checkpoint-2")),
        # resumed at epoch 1, which re-encodes its snapshot; the last epoch trained and evaluated, its checkpoint
        # not written: the next attempt redoes it from checkpoint-4 and the two snapshots saved
        ("epoch_evaluated:2", lambda: len(read_json(run_dir / "metrics.json")) == 3
         and load_file(str(snc))["vectors"].shape[1] == 2
         and last_complete_checkpoint(ckpts).endswith("checkpoint-4")),
        # trained to the end; the dense model published, the compact one not
        ("model_published", lambda: (run_dir / "model" / "model.safetensors").exists()
         and not (run_dir / "sparse").exists()),
    ]
    for kill_at, left in chain:
        cli(cap_m_args, run_dir, kill_at)
        assert left(), f"unexpected state after the kill at {kill_at}"
    cli(cap_m_args, run_dir)
    assert_same_cap_m(run_dir, cap_m_reference)
    assert not list(run_dir.glob("*checkpoints*"))  # a finished run keeps no Trainer checkpoints


def test_cap_f_reports_and_skips_damaged_files(cap_f_args, cap_f_reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(cap_f_reference, run_dir)
    s0, s1 = run_dir / "stages" / "0.25", run_dir / "stages" / "0.5"
    truncate(run_dir / "banks" / "fic.safetensors")
    truncate(s0 / "masks.safetensors")  # a finished stage with damaged masks is done again ...
    truncate(s0 / "checkpoints" / "checkpoint-4" / "trainer_state.json")  # ... from its previous checkpoint
    (s1 / "DONE").unlink()  # stage 0.5 as a kill during its retraining leaves it, and then damaged:
    truncate(s1 / "selected" / "snc.safetensors")  # its selection is made again,
    truncate(s1 / "checkpoints" / "checkpoint-4" / "model.safetensors")  # retraining resumes from checkpoint-2
    run(composed(cap_f_args), run_dir)
    out = capsys.readouterr().out
    assert "fic.safetensors is cut short or corrupt" in out and "encoding the fic bank again" in out
    assert f"{s0 / 'masks.safetensors'} is cut short or corrupt" in out and "redoing stage 0.25" in out
    assert f"skipping checkpoint {s0 / 'checkpoints' / 'checkpoint-4'}" in out
    assert "choosing the heads and neurons of stage 0.5 again" in out
    assert f"skipping checkpoint {s1 / 'checkpoints' / 'checkpoint-4'}" in out
    assert_same_cap_f(run_dir, cap_f_reference)


@pytest.mark.parametrize("damage", ["last checkpoint", "prc bank"])
def test_cap_m_reports_and_skips_damaged_files(cap_m_args, cap_m_reference, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(cap_m_reference, run_dir)
    for folder in ("model", "sparse"):  # as a kill before the export leaves it
        shutil.rmtree(run_dir / folder)
    truncate(run_dir / "banks" / "fic.safetensors")
    if damage == "last checkpoint":  # resumes from checkpoint-4: epoch 2 again, from the saved SnC
        truncate(run_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json")
    else:  # the PrC a resumed epoch needs is gone: training starts over, and must not use the saved SnC early
        truncate(run_dir / "banks" / "prc.safetensors")
    run(composed(cap_m_args), run_dir)
    out = capsys.readouterr().out
    assert "encoding the fic bank again" in out
    if damage == "last checkpoint":
        assert f"skipping checkpoint {run_dir / 'checkpoints' / 'checkpoint-6'}" in out
    else:
        assert "prc.safetensors is cut short or corrupt" in out and "training starts over" in out
    assert_same_cap_m(run_dir, cap_m_reference)


def test_a_killed_export_leaves_no_half_written_folder(cap_f_reference, tmp_path, monkeypatch):
    import cap.export
    from cap.export import load_pruned, main

    def killed(name):
        raise KeyboardInterrupt(name)

    out = tmp_path / "export"
    monkeypatch.setattr(cap.export, "crash_point", killed)
    with pytest.raises(KeyboardInterrupt, match="export_written"):
        main([str(cap_f_reference), "--stage", "0.5", "--out", str(out)])
    assert not out.exists()
    monkeypatch.undo()
    main([str(cap_f_reference), "--stage", "0.5", "--out", str(out)])
    assert sum(load_pruned(out).config.heads_per_layer) == 4  # of 8: stage 0.5
    assert not list(tmp_path.glob(".export*"))


def test_file_problem_names_what_a_crash_cuts_short(tmp_path):
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "a.safetensors"))
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "optimizer.pt")
    (tmp_path / "trainer_state.json").write_text('{"global_step": 4}')
    for name in ("a.safetensors", "optimizer.pt", "trainer_state.json"):
        assert file_problem(tmp_path / name) is None
        truncate(tmp_path / name)
        assert "cut short or corrupt" in file_problem(tmp_path / name), name
    assert "missing" in file_problem(tmp_path / "nothing.safetensors")


def test_a_checkpoint_with_a_truncated_file_is_skipped(tmp_path, capsys):
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        save_file({"w": torch.ones(8)}, str(folder / "model.safetensors"))
    truncate(tmp_path / "checkpoint-4" / "model.safetensors")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4" in capsys.readouterr().out


def test_a_redone_stage_replaces_its_metrics_rows_in_place(tmp_path):
    append_metrics(tmp_path, [{"stage": 0, "split": "validation", "accuracy": 0.5},
                              {"stage": 1, "split": "validation", "accuracy": 0.6}])
    append_metrics(tmp_path, [{"stage": 0, "split": "validation", "accuracy": 0.7}])
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["stage"], r["accuracy"]) for r in rows] == [(0, 0.7), (1, 0.6)]


def test_publish_dir_replaces_a_stale_folder_whole(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.txt").write_text("old")
    (tmp_path / "model.tmp").mkdir()
    (tmp_path / "model.tmp" / "config.json").write_text("{}")
    publish_dir(tmp_path / "model.tmp", tmp_path / "model")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
