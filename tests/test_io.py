import json

from cap.io import append_metrics, last_complete_checkpoint, read_json


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
