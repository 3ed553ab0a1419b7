"""cap.recipes: what every run prints (its run dir and final metrics, `already finished` on a re-run, the model line),
the config a finished run keeps on record when launched again, and the sparsity a config aims at."""
import logging

import pytest
from omegaconf import OmegaConf

from helpers import composed, tiny_overrides

from cap.methods import nominal_sparsity
from cap.recipes import run, summary


@pytest.mark.parametrize("overrides,expected", [
    (["method=finetune"], 0.0),
    (["method=cap_f"], 0.9),                                   # the last step of prune.sequence
    (["method=cap_f", "prune.sequence=[0.25,0.5]"], 0.5),
    (["method=cap_m"], 0.9),                                   # 1 - the Top-K keep fraction 0.1
    (["method=cap_m", "prune.final=0.03"], 0.97),
    (["method=cap_soft"], None),                               # λ decides where it lands
    (["method=cap_soft", "prune.target_sparsity=0.6"], 0.6),
    (["experiment=paper/cap_m/qqp_97"], 0.97),
    (["experiment=paper/cap_soft/mnli_50"], 0.5),
])
def test_nominal_sparsity_of_each_method(overrides, expected):
    assert nominal_sparsity(composed(overrides)) == expected


def test_summary_shows_the_final_stage_and_its_warnings():
    rows = [{"stage": 1, "method": "cap_soft", "step": 4, "sparsity": 0.0, "sparsity_entries": 0.0,
             "split": "validation", "accuracy": 0.5},
            {"stage": 2, "method": "cap_soft", "step": 8, "sparsity": 0.0012, "sparsity_entries": 0.0012,
             "split": "validation", "accuracy": 0.75, "warnings": ["it pruned (almost) nothing"]}]
    assert summary("runs/x", rows, "cap_soft") == ("run dir: runs/x\n"
                                                   "  validation (stage 2, sparsity 0.0012): accuracy=0.7500\n"
                                                   "  warning: it pruned (almost) nothing")
    cap_f = [{**rows[0], "stage": 0, "sparsity": 0.5}, {**rows[0], "stage": 1, "sparsity": 0.9}]
    assert summary("d", cap_f, "cap_f").splitlines()[1:] == [  # every CAP-f stage is a result of its own
        "  validation (stage 0, sparsity 0.5000): accuracy=0.5000",
        "  validation (stage 1, sparsity 0.9000): accuracy=0.5000"]


def test_a_run_says_its_model_once_prints_its_run_dir_and_a_rerun_says_already_finished_keeping_its_config(
        tiny_model_dir, data_dir, tmp_path, capfd):
    cfg = composed([*tiny_overrides(tiny_model_dir, "sst2"), f"data.dir={data_dir}"])
    saved = tmp_path / ".hydra" / "config.yaml"  # as Hydra writes it at every launch
    saved.parent.mkdir()
    OmegaConf.save(cfg, saved)
    library = []  # what transformers logs: its own handler writes where capfd does not look
    handler = logging.Handler()
    handler.emit = lambda record: library.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        rows = run(cfg, tmp_path)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    out, err = capfd.readouterr()
    # transformers' LOAD REPORT table of the new head is replaced by one line of ours
    assert out.count(f"model: {tiny_model_dir} + a new sst2 head "
                     "(classifier.weight, classifier.bias initialised randomly)") == 1
    assert not any("LOAD REPORT" in m for m in library) and "MISSING" not in out + err
    line = f"  validation (stage final, sparsity 0.0000): accuracy={rows[0]['accuracy']:.4f}"
    assert f"run dir: {tmp_path}\n{line}\n" in out
    ran_with = saved.read_text()
    saved.write_text(ran_with + "a_default_added_since: 1\n")  # a re-launch composes the defaults of its day
    assert run(cfg, tmp_path) == rows
    assert saved.read_text() == ran_with  # the record stays the config the run ran with
    out, _ = capfd.readouterr()
    assert out.splitlines() == [f"already finished: {tmp_path} (trainer.resume=false starts over)",
                                f"run dir: {tmp_path}", line]
