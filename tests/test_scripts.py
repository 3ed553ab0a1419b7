"""scripts/oneshot_masks.py on the tiny SST-2 teacher: what its masks keep (read back from its JSON), and the
movement scores it learns; the study reports (scale_report.py, select_report.py, gradient_balance.py) on fake run
dirs; and every committed study's tables are what its committed runs give."""
import argparse
import importlib.util
import json
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from cap.data import load_task_data
from cap.pruning.movement import PRUNED_MODULES, prunable_linears

from helpers import REPO, cap_f_overrides, cap_f_rows, cap_m_rows, composed, fake_run, tiny_overrides


def script_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.slow
def test_oneshot_masks_zero_what_they_say(sst2_teacher_dir, data_dir, tmp_path):
    script = script_module("oneshot_masks")
    out = tmp_path / "oneshot.json"
    script.main([str(sst2_teacher_dir), "--task", "sst2", "--data-dir", str(data_dir), "--keep", "1.0", "0.5", "0.0",
                 "--movement-updates", "2", "--max-train-samples", "16", "--batch-size", "8",
                 "--probe-sentences", "8", "--group-keep", "0.5", "--out", str(out)])
    written = json.loads(out.read_text())["rows"]
    groups = [r for r in written if "only" in r]
    written = [r for r in written if "only" not in r]
    rows = {(r["criterion"], r["keep"]): r["validation"]["accuracy"] for r in written}
    criteria = ("magnitude", "random", "movement", "movement_flipped", "movement_extremes")
    assert set(rows) == {("dense", 1.0), *((c, k) for c in criteria for k in (1.0, 0.5, 0.0))}
    # the masks zero what they say (the tiny model's weights have no exact zeros of their own)
    for r in written[1:]:
        assert abs(r["matrix_sparsity"] - (1 - r["keep"])) < 1e-3, r
    # keeping everything is the dense model, whatever chooses the mask
    assert {rows[(c, 1.0)] for c in criteria} == {rows[("dense", 1.0)]}
    # keeping nothing zeroes every encoder matrix: every criterion gives the same model
    assert len({rows[(c, 0.0)] for c in criteria}) == 1
    # the output change is 0 when everything is kept, 1 when nothing is; removing half by |W| changes less than
    # removing half at random (above 1 only where the removed contributions add up: movement's one-signed tails)
    change = {(r["criterion"], r["keep"]): r["output_change"] for r in written[1:]}
    assert all(change[(c, 1.0)] == 0 and abs(change[(c, 0.0)] - 1) < 1e-6 for c in criteria)
    assert 0 < change[("magnitude", 0.5)] < change[("random", 0.5)] < 1
    # one group at a time (--group-keep 0.5): the six kinds, then the layers, each partitioning the masked entries
    kinds, layers = groups[:6], groups[6:]
    assert [r["only"] for r in kinds] == list(PRUNED_MODULES)
    assert [r["only"] for r in layers] == [f"layer.{i}" for i in range(len(layers))] and len(layers) > 1
    for part in (kinds, layers):
        assert abs(sum(r["matrix_sparsity"] for r in part) - 0.5) < 1e-3


def test_movement_scores_are_learned_per_matrix(sst2_teacher_dir, data_dir):
    script = script_module("oneshot_masks")
    tokenizer = AutoTokenizer.from_pretrained(sst2_teacher_dir)
    train = load_task_data("sst2", tokenizer, data_dir=data_dir, max_train_samples=16).train
    args = argparse.Namespace(movement_updates=3, score_lr=0.1, lr=3e-5, batch_size=8, seed=0)
    first, again = (script.movement_scores(sst2_teacher_dir, train, DataCollatorWithPadding(tokenizer), args)
                    for _ in range(2))
    model = AutoModelForSequenceClassification.from_pretrained(sst2_teacher_dir)
    assert {n: tuple(s.shape) for n, s in first.items()} == {n: tuple(m.weight.shape)
                                                              for n, m in prunable_linears(model)}
    # Adam moves a score that sees a gradient by about lr per update: three at lr 0.1 stay well under 0.45;
    # the same seed, the same scores
    moved = torch.cat([s.flatten() for s in first.values()])
    assert 0 < moved.abs().max() <= 0.45 and (moved != 0).float().mean() > 0.5
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_scale_report_pairs_each_cap_f_arm_with_its_baseline_per_size_path_sparsity_and_seed(tmp_path):
    import csv

    runs = tmp_path / "runs"
    paper = {"contrast": {"pooling": "cls", "unsup_weight": 0.3}}
    chosen = {"contrast": {"pooling": "auto", "unsup_weight": 0.03}}
    new_path = {"trainer": {"batch_size": 16, "precision": "bf16"}, "data": {"group_by_length": True}}
    accuracies = {(1000, 1): (0.70, 0.60, 0.78, 0.74), (1000, 2): (0.72, 0.62, 0.76, 0.70),
                  (8000, 1): (0.80, 0.78, 0.79, 0.75)}  # CAP-f 50/90 %, then the baseline's
    for (size, seed), (f50, f90, b50, b90) in accuracies.items():
        common = {"data": {"max_train_samples": size}, "trainer": {"batch_size": 16}, "prune": {"retrain_epochs": 2}}
        fake_run(runs / f"f{size}-{seed}", "sst2", "cap_f", seed, cap_f_rows(f50, f90), **common, **paper)
        fake_run(runs / f"b{size}-{seed}", "sst2", "cap_f", seed, cap_f_rows(b50, b90),
                 **{**common, "contrast": {"enabled": False}})
    # the 8,000-sentence size again on the new path, the chosen setting beside the paper's: never averaged with fp32
    common = {"data": {"max_train_samples": 8000, "group_by_length": True}, "prune": {"retrain_epochs": 2},
              "trainer": new_path["trainer"]}
    fake_run(runs / "n-paper", "sst2", "cap_f", 1, cap_f_rows(0.81, 0.77), **common, **paper)
    fake_run(runs / "n-chosen", "sst2", "cap_f", 1, cap_f_rows(0.83, 0.80), **common, **chosen)
    fake_run(runs / "n-base", "sst2", "cap_f", 1, cap_f_rows(0.82, 0.76), **{**common, "contrast": {"enabled": False}})
    fake_run(runs / "n-unpaired", "sst2", "cap_f", 2, cap_f_rows(0.5, 0.5), **common, **chosen)  # no seed-2 baseline
    out = script_module("scale_report").main([str(runs), "--out", str(tmp_path / "out")])
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and set(rows[0]) >= {"train_samples", "updates_per_step", "path", "arm", "seed", "gap"}
    row = next(r for r in rows if (r["train_samples"], r["sparsity"], r["seed"]) == ("1000", "0.9", "2"))
    assert (row["updates_per_step"], row["path"], float(row["gap"])) == ("126", "fp32", -8.0)  # ceil(1000/16)*2
    gap = (out / "gap.md").read_text()
    assert "| 1000 | 126 | fp32 | CAP-f (cls, unsup 0.3) | 0.5 | 2 | 71.00 ± 1.41 | 77.00 ± 1.41 | -6.00 ± 2.83 |" in gap
    assert "| 8000 | 1000 | fp32 | CAP-f (cls, unsup 0.3) | 0.9 | 1 | 78.00 | 75.00 | +3.00 |" in gap
    assert "| 8000 | 1000 | bf16, length-grouped | CAP-f (auto, unsup 0.03) | 0.9 | 1 | 80.00 | 76.00 | +4.00 |" in gap
    assert "| 8000 | 1000 | bf16, length-grouped | CAP-f (cls, unsup 0.3) | 0.5 | 1 | 81.00 | 82.00 | -1.00 |" in gap
    assert (out / "gap.png").read_bytes()[:4] == b"\x89PNG"
    # a baseline in another folder pairs as well; one run reached twice (two copies) is refused, not averaged
    (tmp_path / "elsewhere").mkdir()
    shutil.move(runs / "n-base", tmp_path / "elsewhere" / "n-base")
    again = script_module("scale_report").main([str(runs), str(tmp_path / "elsewhere"), "--out", str(tmp_path / "2")])
    assert (again / "gap.md").read_text() == gap
    shutil.copytree(runs / "n-paper", tmp_path / "elsewhere" / "n-paper")
    with pytest.raises(SystemExit, match="two CAP-f"):
        script_module("scale_report").main([str(runs), str(tmp_path / "elsewhere"), "--out", str(tmp_path / "3")])


def test_the_committed_scale_study_is_what_its_runs_give(tmp_path):
    """results/minilm-sst2-scale/ (scripts/scale_minilm_sst2.sh, scale_up_minilm_sst2.sh): its tables are what
    cap.report and scripts/scale_report.py make of the runs committed beside them (and, for the chosen setting at
    1,000 sentences, of the selection study's dev runs)."""
    from cap.report import main as report

    committed = REPO / "results" / "minilm-sst2-scale"
    select_dev = REPO / "results" / "minilm-sst2-select" / "runs" / "dev"  # the choice at 1,000 sentences
    out = script_module("scale_report").main([str(committed / "runs"), str(select_dev), "--out", str(tmp_path)])
    report([str(committed / "runs"), "--out", str(tmp_path / "report")])
    for name in ("table.csv", "gap.md"):
        assert (out / name).read_text() == (committed / name).read_text(), name
    for name in ("table.md", "table.csv"):
        assert (tmp_path / "report" / name).read_text() == (committed / "report" / name).read_text(), name


def saved_run(path, cfg):
    """A finished CAP-f run dir with a full composed config, as Hydra saves it."""
    from omegaconf import OmegaConf

    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml")
    (path / "metrics.json").write_text(json.dumps(cap_f_rows(0.8, 0.7)))
    return path


def test_teacher_table_finds_each_runs_cached_teacher_and_keeps_the_rows_of_one_gone(tmp_path):
    from omegaconf import OmegaConf

    from cap.recipes.finetune import teacher_run

    cfg = composed(["task=sst2", "method=cap_f", "data.max_train_samples=64", "trainer.precision=fp32",
                    "teacher.seed=42", "data.seed=42"])
    for seed in (1, 2):  # two runs, one teacher (pinned, as the studies pin it)
        saved_run(tmp_path / "runs" / f"s{seed}", OmegaConf.merge(cfg, {"seed": seed}))
    teacher = tmp_path / "work" / teacher_run(cfg)[0]
    teacher.mkdir(parents=True)
    (teacher / "metrics.json").write_text(json.dumps([{"stage": "final", "method": "finetune", "sparsity": 0.0,
                                                       "step": 8, "split": "validation", "accuracy": 0.8521}]))
    table = script_module("teacher_table")
    args = [str(tmp_path / "runs"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "teachers.md")]
    row = f"| {teacher.name} | sst2 | 64 | fp32 | 2 | validation | accuracy | 85.21 |"
    assert row in table.main(args).read_text()
    shutil.rmtree(teacher)  # gone from the work dir: the measured row stays
    assert row in table.main(args).read_text()
    assert "not found" in table.main([*args[:-1], str(tmp_path / "fresh.md")]).read_text()


def test_teacher_table_fits_a_missing_teacher_again_from_the_runs_config(tiny_model_dir, tmp_path):
    saved_run(tmp_path / "runs" / "one",
              composed([*tiny_overrides(tiny_model_dir, "sst2"), "method=cap_f", "trainer.precision=fp32"]))
    out = script_module("teacher_table").main([str(tmp_path / "runs"), "--work", str(tmp_path / "work"),
                                               "--out", str(tmp_path / "teachers.md"), "--fit-missing"])
    row = next(line for line in out.read_text().splitlines() if line.startswith("| sst2-"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:7] == ["validation", "accuracy"] and 0 <= float(cells[7]) <= 100
    assert list((tmp_path / "work").rglob("model/DONE"))  # fine-tuned into the work dir's teacher cache


def test_gradient_balance_reads_every_stage_of_a_cap_f_run(tiny_model_dir, sst2_teacher_dir, tmp_path):
    from omegaconf import OmegaConf

    from cap.recipes import run

    cfg = composed(cap_f_overrides(tiny_model_dir, sst2_teacher_dir, "prune.sequence=[0.25,0.5]",
                                   "trainer.keep_checkpoints=true", "trainer.logging_steps=1"))
    run_dir = tmp_path / "runs" / "one"
    run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    script = script_module("gradient_balance")
    out = script.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    points = json.loads((out / "balance.json").read_text())["points"]
    assert [(p["stage"], p["step"]) for p in points] == [(0.25, 1), (0.25, 2), (0.5, 1), (0.5, 2)]
    assert all(p["grad_norm_task"] > 0 and p["pooling"] == "cls" and p["accuracy"] is not None for p in points)
    assert points[0]["grad_norm_contrast"] > 0  # FiC and PrC pull from the first stage on
    assert "| cls | 0.25 | 2 |" in (out / "balance.md").read_text()


def test_the_committed_gradient_balance_is_what_its_points_give(tmp_path):
    import shutil

    committed = REPO / "results" / "minilm-sst2-balance"
    shutil.copy(committed / "balance.json", tmp_path / "balance.json")
    script_module("gradient_balance").main(["--from-json", "--out", str(tmp_path)])
    assert (tmp_path / "balance.md").read_text() == (committed / "balance.md").read_text()


def test_select_report_chooses_on_trainval_and_reads_dev_beside_the_scale_runs(tmp_path):
    """scripts/select_report.py: phase 1 ranks the CAP-f candidates by trainval accuracy (the baseline is only the
    reference), waits for every candidate's seeds, and phase 2 puts the chosen runs beside the scale study's runs of
    the same size, each minus the baseline paired by seed."""

    def rows(acc50, acc90, split):
        return [{**r, "split": split} for r in cap_f_rows(acc50, acc90)]

    runs, scale = tmp_path / "runs", tmp_path / "scale"
    common = {"data": {"max_train_samples": 1000}}
    candidates = {("cls", 0.3): (0.70, 0.60), ("mean", 0.3): (0.74, 0.66), ("cls", 0.03): (0.75, 0.62)}
    for seed in (1, 2):
        for (pooling, weight), (a50, a90) in candidates.items():
            fake_run(runs / f"select/{pooling}-{weight}-{seed}", "sst2", "cap_f", seed,
                     rows(a50 + seed / 100, a90, "trainval"), contrast={"pooling": pooling, "unsup_weight": weight},
                     **common)
        if seed == 1:  # the baseline's seed 2 is missing: no choice yet
            fake_run(runs / f"select/base-{seed}", "sst2", "cap_f", seed, rows(0.9, 0.9, "trainval"),
                     contrast={"enabled": False}, **common)
    fake_run(runs / "select/base-2", "sst2", "cap_f", 2, rows(0.77, 0.67, "trainval")[:1],  # under way: 50 % only
             contrast={"enabled": False}, **common)
    script = script_module("select_report")
    out = script.main([str(runs), "--scale", str(scale), "--out", str(tmp_path / "out")])
    assert not (out / "choice.json").exists() and not (out / "dev.md").exists()
    (runs / "select/base-2/metrics.json").write_text(json.dumps(rows(0.77, 0.67, "trainval")))  # finished
    script.main([str(runs), "--scale", str(scale), "--out", str(out)])
    choice = json.loads((out / "choice.json").read_text())
    assert choice["chosen"] == ["contrast.pooling=mean", "contrast.unsup_weight=0.3"]  # 70.75 vs 69.25 vs 65.75
    assert "| contrast.pooling=mean contrast.unsup_weight=0.3 | 0.5 | 2 | 75.50 ± 0.71 | -8.00 ± 9.90 |" in \
        (out / "selection.md").read_text()

    for seed, (chosen, paper, base) in {1: (0.80, 0.70, 0.78), 2: (0.82, 0.68, 0.79)}.items():
        fake_run(runs / f"dev/{seed}", "sst2", "cap_f", seed, rows(chosen, 0.5, "validation"),
                 contrast={"pooling": "mean", "unsup_weight": 0.3}, **common)
        fake_run(scale / f"paper-{seed}", "sst2", "cap_f", seed, rows(paper, 0.5, "validation"), **common)
        fake_run(scale / f"base-{seed}", "sst2", "cap_f", seed, rows(base, 0.5, "validation"),
                 contrast={"enabled": False}, **common)
        fake_run(scale / f"big-{seed}", "sst2", "cap_f", seed, rows(0.1, 0.1, "validation"),
                 data={"max_train_samples": 8000})  # another size: not read
    script.main([str(runs), "--scale", str(scale), "--out", str(out)])
    dev = (out / "dev.md").read_text()
    assert "| baseline | 0.5 | 2 | 78.50 ± 0.71 |  |" in dev
    assert "| contrast.pooling=mean contrast.unsup_weight=0.3 | 0.5 | 2 | 81.00 ± 1.41 | +2.50 ± 0.71 |" in dev
    assert "| contrast.pooling=cls contrast.unsup_weight=0.3 | 0.5 | 2 | 69.00 ± 1.41 | -9.50 ± 2.12 |" in dev
    assert (out / "select.png").read_bytes()[:4] == b"\x89PNG"


def test_the_committed_contrast_selection_is_what_its_runs_give(tmp_path):
    """results/minilm-sst2-select/ (scripts/select_contrast_minilm_sst2.sh): the trainval table, the choice and the
    dev table are what scripts/select_report.py makes of the committed runs (and the scale study's)."""
    committed = REPO / "results" / "minilm-sst2-select"
    script_module("select_report").main([str(committed / "runs"), "--scale",
                                         str(REPO / "results" / "minilm-sst2-scale" / "runs"), "--out", str(tmp_path)])
    for name in ("selection.md", "selection.csv", "choice.json", "dev.md", "dev.csv"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name


@pytest.mark.parametrize("study, element_runs", [
    ("minilm-sst2-cap-soft-vs-soft", None),  # scripts/cap_soft_vs_soft_movement.sh
    ("minilm-sst2-movement", None),  # scripts/movement_vs_magnitude_minilm_sst2.sh
    # scripts/structured_vs_element_cap_soft.sh: its structured runs beside the CAP-soft study's element runs
    ("minilm-sst2-structured-cap-soft", "minilm-sst2-cap-soft-vs-soft/runs/sst2/cap_soft/contrast.enabled=True,*"),
])
def test_the_committed_movement_studies_are_what_their_runs_give(study, element_runs, tmp_path):
    """results/<study>/: cap.report's table of the committed runs (the command its script ends with)."""
    from cap.report import main as report

    committed = REPO / "results" / study
    extra = sorted(map(str, (REPO / "results").glob(element_runs))) if element_runs else []
    assert element_runs is None or extra
    report([str(committed / "runs"), *extra, "--out", str(tmp_path)])
    for name in ("table.md", "table.csv"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name


def test_epoch_curves_read_every_epoch_of_movement_runs(tmp_path):
    """scripts/epoch_curves.py: one curve per movement run under the given folders (CAP-f runs skipped), every
    epoch, CAP first, structured scores set apart."""

    fake_run(tmp_path / "a" / "base", "sst2", "cap_m", 1, cap_m_rows(0.5, 0.4), contrast={"enabled": False})
    fake_run(tmp_path / "a" / "cap", "sst2", "cap_m", 1, cap_m_rows(0.8, 0.7))
    fake_run(tmp_path / "a" / "f", "sst2", "cap_f", 1, cap_f_rows(0.8, 0.7))
    fake_run(tmp_path / "b" / "cap", "sst2", "cap_m", 2, cap_m_rows(0.7, 0.6), prune={"granularity": "structured"})
    script = script_module("epoch_curves")
    runs = script.curves([tmp_path / "a", tmp_path / "b"], split="heldout")
    assert [(c["series"], c["seed"], c["epochs"]) for c in runs] == [
        ("full", 1, [1, 2, 3]), ("full, structured", 2, [1, 2, 3]), ("baseline", 1, [1, 2, 3])]
    assert runs[0]["metric"] == [50.0, 50.0, 80.0] and abs(runs[0]["sparsity"][-1] - 90.04) < 1e-9
    assert script.plot(runs, tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_interleaved_timing_cancels_a_load_change_between_rounds(monkeypatch):
    """The benches' timer (scripts/interleaved.py) on a fake clock: the two things alternate which goes first, and
    a round where the machine gets 10x slower for both leaves the reported ratio alone."""
    interleaved = script_module("interleaved")
    clock, order = [0.0], []
    monkeypatch.setattr(interleaved.time, "perf_counter", lambda: clock[0])

    def thing(name, cost):
        def call():
            order.append(name)
            measured_round = (len(order) - 3) // 2  # after one warm-up call each
            clock[0] += cost * (10 if measured_round == 2 else 1)
        return call

    t = interleaved.interleaved_ratio(thing("a", 2.0), thing("b", 1.0), rounds=5, min_seconds=0)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert t["ratio"] == 0.5 and t["ratio_range"] == [0.5, 0.5] and t["calls_per_round"] == 1
    assert t["baseline_s"] == 2.0 and t["candidate_s"] == 1.0
    # a measurement repeats the call until the baseline has taken about min_seconds (a: 2 s a call)
    calls = interleaved.interleaved_ratio(thing("a", 2.0), thing("b", 1.0), rounds=1, min_seconds=4.0)
    assert calls["calls_per_round"] == 2


def test_collecting_runs_never_empties_the_committed_ones_when_the_sweep_is_missing(tmp_path):
    import subprocess

    committed = tmp_path / "runs" / "a" / "metrics.json"
    committed.parent.mkdir(parents=True)
    committed.write_text("[]")
    direct = subprocess.run([str(REPO / "scripts" / "collect_finished_runs.sh"), str(tmp_path / "missing"),
                             str(tmp_path / "runs")], capture_output=True, text=True)
    assert direct.returncode != 0 and "no such sweep dir" in direct.stderr
    # a study script's `collect` (study.sh) on a fresh clone: a note, and the report reads the committed runs
    study = subprocess.run(["bash", "-c", f'STUDY=x; source {REPO / "scripts" / "study.sh"} {tmp_path / "work"}; '
                            f'collect {tmp_path / "missing"} {tmp_path / "runs"}'], capture_output=True, text=True)
    assert study.returncode == 0 and "the report reads the committed" in study.stderr
    assert committed.read_text() == "[]"


def soft_rows(accuracies, sparsity=0.9, split="validation"):
    """A CAP-soft / soft-movement run's metrics.json: one row per epoch."""
    return [{"stage": epoch, "method": "cap_soft", "step": 10 * epoch, "sparsity": sparsity, "split": split,
             "accuracy": a, "sparsity_entries": sparsity} for epoch, a in enumerate(accuracies, 1)]


def test_baseline_report_chooses_on_trainval_then_reads_dev_and_the_mechanism_against_the_choice(tmp_path):
    """scripts/baseline_report.py: the rule (sparsity first, then trainval accuracy over the seeds) waits for the
    whole grid; dev and mechanism arms are read against the chosen baseline, paired by seed."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    grid = {(0.01, 0.1, 0.9): (0.81, 0.9), (0.1, 0.1, 0.9): (0.85, 0.80),  # the best, but short of 0.89 sparsity
            (0.01, 1, 0): (0.60, 0.9), (0.1, 1, 0): (0.79, 0.9)}
    for seed in (1, 2):
        for (lr, ce, kd), (acc, sparsity) in grid.items():
            fake_run(runs / f"select/{lr}-{ce}-{seed}", "sst2", "cap_soft", seed,
                     soft_rows([0.5, acc + seed / 100], sparsity, "trainval"), contrast={"enabled": False},
                     prune={"score_lr": lr, "granularity": "element"}, ce={"weight": ce}, kd={"weight": kd})
    import subprocess
    import sys

    def report():
        subprocess.run([sys.executable, str(REPO / "scripts" / "baseline_report.py"), str(runs), "--out", str(out)],
                       check=True, capture_output=True)

    report()
    choice = json.loads((out / "choice.json").read_text())
    assert choice["overrides"] == ["prune.score_lr=0.01", "ce.weight=0.1", "kd.weight=0.9"]  # 82.5 at 0.9
    assert "| soft movement prune.score_lr=0.1 ce.weight=0.1 kd.weight=0.9 | [1, 2] | [86.0, 87.0] | 86.50 ± 0.71 | " \
           "0.8 |" in (out / "selection.md").read_text()

    base = {"contrast": {"enabled": False}, "prune": {"score_lr": 0.01, "granularity": "element"},
            "ce": {"weight": 0.1}, "kd": {"weight": 0.9}}
    cap = {"contrast": {"enabled": True, "sup_weight": 10, "unsup_weight": 0.1, "prc": True, "snc": True, "fic": True},
           "prune": {"score_lr": 0.1, "granularity": "element"}, "ce": {"weight": 0.1}, "kd": {"weight": 0.9}}
    for seed, (b, c, no_sup, structured) in {1: (0.80, 0.82, 0.79, 0.70), 2: (0.81, 0.84, 0.80, 0.72)}.items():
        fake_run(runs / f"dev/base-{seed}", "sst2", "cap_soft", seed, soft_rows([b]), **base)
        fake_run(runs / f"dev/cap-{seed}", "sst2", "cap_soft", seed, soft_rows([c]), **cap)
        fake_run(runs / f"mechanism/nosup-{seed}", "sst2", "cap_soft", seed, soft_rows([no_sup]),
                 **{**cap, "contrast": {**cap["contrast"], "sup_weight": 0}})
        fake_run(runs / f"mechanism/prc-{seed}", "sst2", "cap_soft", seed, soft_rows([b]),
                 **{**cap, "contrast": {**cap["contrast"], "snc": False, "fic": False}})
        fake_run(runs / f"mechanism/structured-{seed}", "sst2", "cap_soft", seed, soft_rows([structured], 0.85),
                 **{**base, "prune": {"score_lr": 0.01, "granularity": "structured"}})
    fake_run(runs / "mechanism/reaches-1", "sst2", "cap_soft", 1, soft_rows([0.75]), hydra=False,
             **{**cap, "prune": {"score_lr": 0.01, "granularity": "element"},
                "contrast": {**cap["contrast"], "reaches": "weights"}})
    log = [{"update": u, "epoch": epoch, "loss": 1.0, "grad_norm_task_scores": 2.0, "grad_norm_contrast_scores": u,
            "grad_norm_task_weights": 1.0, "grad_norm_contrast_weights": 0.5, "grad_cosine_scores": 0.1,
            "grad_cosine_weights": -0.1, "loss_ce": 0.5, "sparsity_entries": 0.1 * u}
           for u, epoch in ((1, 1.0), (2, 4.0), (3, 8.0))]  # one logged update in each phase
    (runs / "mechanism/reaches-1/trainer_log.jsonl").write_text("\n".join(json.dumps(e) for e in log))
    report()
    assert "CAP-soft minus the baseline, paired by seed [1, 2]: 2.50 ± 0.71 points ([2.0, 3.0])" in \
        (out / "dev.md").read_text()
    mechanism = (out / "mechanism.md").read_text()
    assert "| CAP-soft | [1, 2] | 83.00 ± 1.41 | 0.9 | +2.50 ± 0.71 ([1, 2]) |  |" in mechanism
    assert "| CAP-soft (sup_weight=0) | [1, 2] | 79.50 ± 0.71 | 0.9 | -1.00 ± 0.00 ([1, 2]) | -3.50 ± 0.71 ([1, 2]) " \
           "|" in mechanism
    assert "| CAP-soft (PrC only) | [1, 2] | 80.50 ± 0.71 | 0.9 | +0.00 ± 0.00 ([1, 2]) |" in mechanism
    assert "| CAP-soft (score_lr=0.01, reaches the weights only) | [1] | 75.00 | 0.9 | -5.00 ([1]) | -7.00 ([1]) |" \
        in mechanism  # one seed finished so far
    assert "| structured soft movement prune.score_lr=0.01 ce.weight=0.1 kd.weight=0.9 | [1, 2] | 71.00 ± 1.41 | " \
           "0.85 | -9.50 ± 0.71 ([1, 2]) |" in mechanism
    assert (out / "mechanism.png").stat().st_size > 0
    # where its contrastive gradient goes, per phase: scores / weights pull, then their cosines
    assert "| CAP-soft (score_lr=0.01, reaches the weights only) | 1 | 0.50 / 0.50 / 0.10 / -0.10 | " \
           "1.00 / 0.50 / 0.10 / -0.10 | 1.50 / 0.50 / 0.10 / -0.10 |" in mechanism


def test_the_committed_soft_movement_baseline_study_is_what_its_runs_give(tmp_path):
    """results/minilm-sst2-soft-baseline/ (scripts/tune_soft_movement_baseline.sh): every table the report writes
    is what scripts/baseline_report.py makes of the committed runs."""
    import subprocess
    import sys

    committed = REPO / "results" / "minilm-sst2-soft-baseline"
    subprocess.run([sys.executable, str(REPO / "scripts" / "baseline_report.py"), str(committed / "runs"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".csv", ".json"))
    assert "selection.md" in written
    for name in written:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name


def test_deploy_verdict_takes_the_fastest_format_within_a_point_and_says_how_far_from_the_target(monkeypatch):
    """scripts/bench_deploy.py: a faster format that loses more than a point of accuracy is not the best one."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # its interleaved.py, as when it runs
    deploy = script_module("bench_deploy")

    def row(b1, b32, delta):
        return {"latency": {"batch_1": {"over_dense": b1}, "batch_32": {"over_dense": b32}},
                "accuracy_minus_fp32": delta}

    rows = {"pytorch-fp32": row(0.2, 0.13, 0.0), "onnxruntime-int8": row(0.09, 0.08, -0.7),
            "broken-int4": row(0.01, 0.01, -5.0)}
    verdict = deploy.verdict(rows)
    assert verdict["batch_1"] == {"best_format": "onnxruntime-int8", "over_dense": 0.09, "target": 0.10, "met": True,
                                  "times_over_target": 0.9}
    assert verdict["batch_32"]["best_format"] == "onnxruntime-int8" and not verdict["batch_32"]["met"]
    assert verdict["batch_32"]["times_over_target"] == round(0.08 / 0.07, 2)
