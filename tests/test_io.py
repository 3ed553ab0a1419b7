import json
import os

from cap.io import append_metrics, last_complete_checkpoint, publish_linked, read_json, remove_checkpoints


def test_last_complete_checkpoint_skips_a_folder_cut_short(tmp_path, capsys):
    for step, state in [(2, "{}"), (4, "{}"), (6, '{"global_st'), (8, None)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-8" in capsys.readouterr().out
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_append_metrics_keeps_earlier_rows(tmp_path):
    append_metrics(tmp_path, [{"split": "a", "accuracy": 0.5}])
    append_metrics(tmp_path, [{"split": "b", "accuracy": 0.6}])
    assert [r["split"] for r in read_json(tmp_path / "metrics.json")] == ["a", "b"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert json.loads((tmp_path / "metrics.json").read_text())[1]["accuracy"] == 0.6


def test_remove_checkpoints_deletes_whole_folders_and_finishes_an_interrupted_deletion(tmp_path):
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"x" * 100)
    remove_checkpoints(tmp_path / "checkpoints")
    assert list(tmp_path.iterdir()) == []
    # a run killed while deleting left the folder renamed aside, partly deleted: nothing resumes from it
    (tmp_path / ".checkpoints.deleted" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / ".checkpoints.deleted" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path / "checkpoints") is None
    remove_checkpoints(tmp_path / "checkpoints")  # the next call finishes the deletion
    assert list(tmp_path.iterdir()) == []


def test_publish_linked_shares_the_files_of_its_source(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.json").write_text("{}")
    publish_linked(tmp_path / "stage", tmp_path / "model")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["model.safetensors"]
    assert os.path.samefile(tmp_path / "model" / "model.safetensors", tmp_path / "stage" / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "stage"]
