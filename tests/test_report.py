"""cap.report: fake run dirs aggregated over seeds, ablation labels, the paper join, the outputs; one real tiny run."""
import csv
import json

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import cap_f_rows, cap_m_rows, composed, fake_run, tiny_overrides

from cap.errors import UserError
from cap.report import PAPER, ablation, collect_runs, join_paper, load_paper, main, plot, summarize


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, (a50, a90) in zip((1, 2, 3), [(0.80, 0.70), (0.82, 0.74), (0.84, 0.72)]):
        fake_run(root / f"sst2/cap_f/seed={seed}", "sst2", "cap_f", seed, cap_f_rows(a50, a90))
    fake_run(root / "sst2/cap_f/noprc", "sst2", "cap_f", 1, cap_f_rows(0.78, 0.60), contrast={"prc": False})
    for seed, (acc, f1) in zip((1, 2), [(0.90, 0.86), (0.92, 0.88)]):
        fake_run(root / f"qqp/cap_m/seed={seed}", "qqp", "cap_m", seed, cap_m_rows(acc, f1), prune={"final": 0.1})
    dense = [{"stage": "final", "method": "finetune", "step": 2, "sparsity": 0.0, "split": "validation",
              "accuracy": 0.9}]
    fake_run(root / "sst2/finetune", "sst2", "finetune", 1, dense, hydra=False)
    (root / "teachers/sst2").mkdir(parents=True)  # a teacher cache: metrics without a config is no run
    (root / "teachers/sst2/metrics.json").write_text(json.dumps(dense))
    return root


def by_key(rows, **key):
    found = [r for r in rows if all(r[k] == v for k, v in key.items())]
    assert len(found) == 1, (key, found)
    return found[0]


@pytest.mark.parametrize("method, overrides, label", [
    ("cap_f", {}, "full"),
    ("cap_f", {"contrast": {"enabled": False}}, "baseline"),
    ("cap_m", {"contrast": {"prc": False, "snc": False}}, "-PrC,-SnC"),
    ("cap_m", {"contrast": {"fic": False, "pooling": "mean"}}, "-FiC,pool=mean"),
    ("cap_soft", {"contrast": {"sup_weight": 0.0}, "kd": {"weight": 0}}, "-sup,-KD"),
    ("cap_m", {"contrast": {"enabled": False}, "prune": {"criterion": "magnitude"}}, "baseline,magnitude"),
    ("cap_f", {"contrast": {"unsup_weight": 0, "normalization": "per_anchor"}}, "-unsup,norm=per_anchor"),
    ("cap_m", {"task": {"name": "squad"}, "contrast": {"sup_weight": 0}}, "full"),  # QA has no supervised term
    ("finetune", {"contrast": {"enabled": False}, "kd": {"weight": 0.0}}, "full"),  # the dense run's own defaults
])
def test_ablation_labels_against_the_method_defaults(method, overrides, label):
    assert ablation(OmegaConf.merge(composed([f"method={method}"]), overrides)) == label


def test_seeds_are_averaged_per_sparsity_and_ablation(runs):
    summary = summarize(collect_runs([runs, runs / "sst2"]))  # a run reached twice counts once
    at50 = by_key(summary, method="cap_f", ablation="full", sparsity=0.5)
    assert (at50["n"], at50["seeds"]) == (3, [1, 2, 3])
    assert at50["mean"] == pytest.approx(82.0) and at50["std"] == pytest.approx(2.0)  # sample std of 80, 82, 84
    assert by_key(summary, method="cap_f", ablation="full", sparsity=0.9)["mean"] == pytest.approx(72.0)
    noprc = by_key(summary, method="cap_f", ablation="-PrC", sparsity=0.9)
    assert noprc["n"] == 1 and noprc["std"] is None and noprc["mean"] == pytest.approx(60.0)
    # CAP-m: the last epoch only, grouped at its target 1 - prune.final
    acc = by_key(summary, method="cap_m", metric="accuracy")
    assert (acc["sparsity"], acc["split"], acc["mean"]) == (0.9, "heldout", pytest.approx(91.0))
    assert acc["std"] == pytest.approx(1.4142, abs=1e-3) and acc["sparsity_measured"] == pytest.approx(0.9004)
    assert by_key(summary, method="cap_m", metric="f1")["mean"] == pytest.approx(87.0)
    assert by_key(summary, method="finetune")["mean"] == pytest.approx(90.0)
    assert len(summary) == 7  # no sparsity_* or step columns became metrics; the teacher cache is skipped


def test_runs_of_another_model_are_not_averaged_in(runs):
    fake_run(runs / "sst2/cap_f/bert", "sst2", "cap_f", 1, cap_f_rows(0.9, 0.8), model={"name_or_path": "/x/bert-base"})
    summary = summarize(collect_runs([runs]))
    assert by_key(summary, method="cap_f", ablation="full", sparsity=0.5, model="minilm")["mean"] == pytest.approx(82)
    assert by_key(summary, method="cap_f", ablation="full", sparsity=0.5, model="bert-base")["n"] == 1


def test_runs_of_other_settings_are_kept_apart_not_averaged(runs, tmp_path, capsys):
    """The quickstart (2,000 sentences) and 64-sample sweep runs at 90 % were once pooled into one `n=3` cell."""
    for seed, a90 in ((1, 0.50), (2, 0.56)):
        fake_run(runs / f"sst2/cap_f/small-{seed}", "sst2", "cap_f", seed, cap_f_rows(0.6, a90),
                 data={"max_train_samples": 64})
    summary = summarize(collect_runs([runs]))
    assert "runs with different settings are kept apart" in capsys.readouterr().err
    full = by_key(summary, method="cap_f", ablation="full", sparsity=0.9, settings="data.max_train_samples=null")
    small = by_key(summary, method="cap_f", ablation="full", sparsity=0.9, settings="data.max_train_samples=64")
    assert (full["n"], full["mean"]) == (3, pytest.approx(72.0))
    assert (small["n"], small["seeds"], small["mean"]) == (2, [1, 2], pytest.approx(53.0))
    assert by_key(summary, method="cap_f", ablation="-PrC", sparsity=0.9)["settings"] == ""  # a series of its own
    out = main([str(runs), "--out", str(tmp_path / "report")])
    assert "| minilm | data.max_train_samples=64 | 2 | 53.00 ± 4.24 |" in (out / "table.md").read_text()


def test_paths_logger_and_seed_interpolations_do_not_split_seeds(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path / f"r{seed}", "sst2", "cap_f", seed, cap_f_rows(0.8, 0.7),
                 data={"seed": "${seed}", "dir": f"/data/{seed}"}, logger={"name": "wandb", "group": f"g{seed}"},
                 teacher={"cache_dir": f"/cache/{seed}"}, trainer={"resume": seed == 1, "logging_steps": seed})
    fake_run(tmp_path / "r3", "sst2", "cap_f", 3, cap_f_rows(0.8, 0.7), data={"seed": 3})  # pinned: a setting
    # saved by an older cap: no prune node (today: prune: null), an integer where today's schema writes a float
    fake_run(tmp_path / "m1", "qqp", "cap_m", 1, cap_m_rows(0.9, 0.8), prune={"final": 0.1}, trainer={"warmup": 11000})
    fake_run(tmp_path / "m2", "qqp", "cap_m", 2, cap_m_rows(0.9, 0.8), prune={"final": 0.1, "target_sparsity": None},
             trainer={"warmup": 11000.0})
    summary = summarize(collect_runs([tmp_path]))
    pooled = by_key(summary, method="cap_f", sparsity=0.5, settings="data.seed=${seed}")
    assert pooled["seeds"] == [1, 2]
    assert by_key(summary, method="cap_f", sparsity=0.5, settings="data.seed=3")["n"] == 1
    assert by_key(summary, method="cap_m", metric="f1")["seeds"] == [1, 2]


def test_the_paper_join_gives_deltas_and_adds_sourced_cells(runs):
    rows = join_paper(summarize(collect_runs([runs])), load_paper(PAPER))
    acc = by_key(rows, method="cap_m", metric="accuracy", n=2)  # heldout is set beside the paper's dev number
    assert (acc["paper"], acc["source"]) == (91.6, "issue1") and acc["delta"] == pytest.approx(91.0 - 91.6)
    assert by_key(rows, method="cap_m", metric="f1", n=2)["delta"] == pytest.approx(87.0 - 87.7)
    soft = by_key(rows, method="cap_soft", ablation="full", sparsity=0.9, metric="f1")  # no run of ours
    assert (soft["n"], soft["mean"], soft["paper"], soft["split"]) == (0, None, 87.4, "validation")
    assert (acc["source_kind"], soft["source_kind"]) == ("issue", "issue")
    reprint = by_key(rows, method="cap_soft", ablation="full", sparsity=0.97, metric="f1")  # SMP's reprinted "CAP"
    assert (reprint["paper"], reprint["source"], reprint["source_kind"]) == (86.7, "smp_table1", "reprint")
    assert by_key(rows, method="cap_soft", ablation="baseline", sparsity=0.97, metric="accuracy")["paper"] == 89.1
    assert by_key(rows, method="cap_m", ablation="baseline,magnitude", sparsity=0.9, metric="f1")["paper"] == 75.9
    assert by_key(rows, method="cap_f", ablation="full", sparsity=0.5)["paper"] is None  # not sourced: not filled
    assert not [r for r in rows if r["task"] in ("mnli", "squad")]  # only the tasks we ran


def test_markdown_csv_and_plots(runs, tmp_path):
    out = main([str(runs), "--out", str(tmp_path / "report")])
    table = (out / "table.md").read_text()
    assert ("| qqp | cap_m | full | 0.9 | 0.900 | heldout | accuracy | minilm |  | 2 | 91.00 ± 1.41 | 91.6 | -0.60 | "
            "[issue1](https://github.com/RunxinXu/ContrastivePruning/issues/1) | issue |" in table)
    assert ("| qqp | cap_soft | full | 0.5 |  | validation | accuracy | bert-base-uncased |  | 0 |  | 91.6 |  | "
            "[smp_table1](https://aclanthology.org/2023.acl-long.35) | reprint |" in table)
    assert "- smp_table1 (reprint): https://aclanthology.org/2023.acl-long.35: Jiang et al." in table
    assert "kind: where the paper's number was read" in table
    assert "| sst2 | cap_f | full | 0.5 | 0.500 | validation | accuracy | minilm |  | 3 | 82.00 ± 2.00 |  |  |  |" \
        in table
    assert "| qqp | cap_soft | full | 0.9 |  | validation | f1 | bert-base-uncased |  | 0 |  | 87.4 |" in table
    assert "heldout: held-out *train* rows" in table and "99.2 % of BERT-base" in table
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    row = by_key(rows, method="cap_f", ablation="-PrC", sparsity="0.5")
    assert (row["n"], float(row["mean"]), row["std"], row["seeds"]) == ("1", pytest.approx(78.0), "", "1")
    f1 = by_key(rows, method="cap_m", metric="f1", n="2")
    assert (f1["delta"], f1["source"], f1["source_kind"]) == (
        "-0.7", "https://github.com/RunxinXu/ContrastivePruning/issues/1", "issue")
    for task in ("sst2", "qqp"):
        assert (out / f"{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "mnli.png").exists()


def test_plot_marks_paper_only_points(tmp_path):
    rows = [{"task": "qqp", "method": "cap_soft", "ablation": "baseline", "sparsity": 0.9, "split": "validation",
             "metric": "accuracy", "model": "bert-base-uncased", "settings": "", "n": 0, "mean": None, "std": None,
             "paper": 90.2}]
    assert plot(rows, "qqp", tmp_path / "qqp.png").stat().st_size > 1000


def test_the_legend_names_the_kind_of_each_paper_source(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    legends = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (legends.extend(
        t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()), save(fig, *a, **k))[1])
    cell = {"task": "qqp", "split": "validation", "metric": "f1", "model": "bert-base-uncased", "settings": "", "n": 0,
            "mean": None, "std": None}
    rows = [{**cell, "method": method, "ablation": abl, "sparsity": sparsity, "paper": value, "source_kind": kind}
            for method, abl, sparsity, value, kind in [("cap_soft", "full", 0.9, 87.4, "issue"),
                                                       ("cap_soft", "full", 0.5, 88.6, "reprint"),
                                                       ("cap_m", "baseline", 0.5, 87.8, "reprint")]]
    plot(rows, "qqp", tmp_path / "qqp.png")
    assert legends == ["paper (reprint): cap_m (baseline)", "paper (issue/reprint): cap_soft"]


def test_missing_runs_and_bad_paper_files_are_one_line_errors(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no finished run"):
        collect_runs([tmp_path / "empty"])
    with pytest.raises(UserError, match="no such directory"):
        collect_runs([tmp_path / "nope"])
    fake_run(tmp_path / "odd", "sst2", "magnitude", 1, cap_f_rows(0.8, 0.7))
    with pytest.raises(UserError, match="method 'magnitude' has no conf/method/magnitude.yaml"):
        collect_runs([tmp_path / "odd"])
    (tmp_path / "odd/metrics.json").write_text('[{"stage": 1,')  # cut short
    with pytest.raises(UserError, match="odd/metrics.json: not valid JSON"):
        collect_runs([tmp_path / "odd"])
    bad = tmp_path / "bad.yaml"
    for doc, message in [({"cells": []}, "entries"),
                         ({"entries": [{"task": "qqp", "method": "cap_m", "sparsity": 0.9, "split": "validation",
                                        "metric": "acc", "value": 91.6, "source": None}]}, "both be set"),
                         ({"entries": [{"task": "qqp", "method": "cap_m", "sparsity": 0.9, "split": "validation",
                                        "metric": "accuracy", "value": None, "source": None}]}, "use one of acc"),
                         ({"sources": {"s": {"url": "u"}},
                           "entries": [{"task": "qqp", "method": "cap_m", "sparsity": 0.9, "split": "validation",
                                        "metric": "acc", "value": "91.6%", "source": "s"}]}, "a number"),
                         ({"entries": [{"task": "qqp", "method": "cap_m", "sparsity": 0.9}]}, "missing value"),
                         ({"sources": {"s": {"url": "u", "kind": "blog"}}, "entries": []},
                          "source 's': give its url and its kind, one of paper, reprint, issue, abstract"),
                         ({"sources": {"s": {"url": "u", "kind": "paper"}},
                           "entries": [{"task": "qqp", "method": "cap_m", "sparsity": 0.9, "split": "validation",
                                        "metric": "acc", "value": v, "source": "s"} for v in (91.6, 91.0)]},
                          "two sourced cells for qqp, cap_m, full, 0.9, validation, acc")]:
        bad.write_text(yaml.safe_dump(doc))
        with pytest.raises(UserError, match=message):
            main([str(runs), "--paper", str(bad), "--out", str(tmp_path / "out")])
    bad.write_text("entries: [task: {")
    with pytest.raises(UserError, match="not valid YAML"):
        load_paper(bad)


def test_the_committed_paper_numbers_are_sourced():
    doc = yaml.safe_load(PAPER.read_text())
    for e in doc["entries"] + doc["retention"]:
        assert (e["value"] is None) == (e["source"] is None), e
    paper = load_paper(PAPER)
    cells = {(e["task"], e["method"], e["ablation"], e["sparsity"], e["metric"]): e["value"] for e in paper["entries"]}
    assert cells[("qqp", "cap_m", "full", 0.9, "accuracy")] == 91.6
    assert cells[("qqp", "cap_m", "full", 0.9, "f1")] == 87.7
    assert cells[("qqp", "cap_soft", "full", 0.9, "accuracy")] == 90.7
    assert cells[("qqp", "cap_soft", "full", 0.9, "f1")] == 87.4
    # SMP Table 1's reprinted CAP rows (keyed as CAP-soft) and its KD baselines
    mnli = {(e["method"], e["ablation"], e["sparsity"], e["split"]): e["value"] for e in paper["entries"]
            if e["task"] == "mnli"}
    assert [mnli[("cap_soft", "full", s, "validation_matched")] for s in (0.5, 0.9, 0.97)] == [83.8, 82.0, 80.1]
    assert [mnli[("cap_soft", "full", s, "validation_mismatched")] for s in (0.5, 0.9, 0.97)] == [84.2, 82.9, 81.3]
    assert [cells[("squad", "cap_soft", "full", s, "f1")] for s in (0.5, 0.9, 0.97)] == [88.2, 85.6, 83.0]
    assert [cells[("qqp", "cap_m", "baseline", s, "accuracy")] for s in (0.5, 0.9, 0.97)] == [91.0, 89.7, 86.1]
    assert cells[("squad", "l0", "baseline", 0.9, "exact_match")] == 72.4
    assert {s["kind"] for s in paper["sources"].values()} <= {"paper", "reprint", "issue", "abstract"}
    # the full grid is there, unknown cells as null: 3 methods x 3 sparsities x 7 task metrics, plus CAP-f's steps
    for method in ("cap_f", "cap_m", "cap_soft"):
        for sparsity in (0.5, 0.9, 0.97):
            assert ("squad", method, "full", sparsity, "exact_match") in cells
            assert ("sst2", method, "full", sparsity, "accuracy") in cells
    assert all(("mnli", "cap_f", "full", s, "accuracy") in cells for s in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8))
    assert sum(e["value"] is not None for e in paper["entries"]) == 68
    assert {(r["task"], r["value"]) for r in paper["retention"]} == {("qqp", 99.2), ("mnli", 96.3)}


def test_wandb_offline_run(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = main([str(runs), "--out", str(tmp_path / "report"), "--wandb", "--group", "test"])
    assert list((out / "wandb").glob("offline-run-*"))


def test_report_on_a_real_tiny_finetune(data_dir, tiny_model_dir, tmp_path):
    from cap.recipes import run

    cfg = composed([*tiny_overrides(tiny_model_dir, "sst2"), "method=finetune", "kd.weight=0"])
    run_dir = tmp_path / "runs" / "finetune"
    rows = run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    out = main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    with open(out / "table.csv") as f:
        row = by_key(list(csv.DictReader(f)), method="finetune")
    assert (row["ablation"], row["split"], row["metric"], row["n"]) == ("full", "validation", "accuracy", "1")
    assert float(row["mean"]) == pytest.approx(100 * rows[0]["accuracy"])
    assert (out / "sst2.png").exists()


def test_the_committed_reproduction_is_what_its_runs_give(tmp_path):
    """results/minilm-sst2/ (scripts/reproduce_minilm_sst2.sh) keeps the 15 runs' metrics.json and configs in runs/:
    the committed table must be what cap.report makes of them."""
    committed = PAPER.parents[1] / "minilm-sst2"
    out = main([str(committed / "runs"), "--out", str(tmp_path)])
    assert len(list((committed / "runs").rglob("metrics.json"))) == 15
    for name in ("table.md", "table.csv"):
        assert (out / name).read_text() == (committed / name).read_text(), name
