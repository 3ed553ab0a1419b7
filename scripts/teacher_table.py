"""The teachers behind a study's runs: for every finished run under the given folders, the cached teacher it
distilled from (`teacher.path`, or the folder `cap.recipes.finetune.teacher_run` derives from its config) and that
teacher's own evaluation, one row per teacher. A study commits its runs, not its teachers (hundreds of MB each);
this table is what says how good each teacher was.

    python scripts/teacher_table.py results/minilm-sst2-scale/runs/cap_f-8k --work multiruns/minilm-sst2-scale-up \
        --out results/minilm-sst2-scale/teachers.md

--work is the folder the runs were launched from (their `teacher.cache_dir` is relative to it); run it with the
environment the runs had (`CAP_DATA_DIR`: the data settings are part of a teacher's key). A teacher that is
no longer there (another machine, a cleaned work dir) keeps the rows the table had for it; one never measured
gets a row saying "not found", or, with --fit-missing, is fine-tuned again from the runs' config and measured
(deterministic where the precision and kernels are: a check of the number a README quotes, not the teacher itself).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from cap.recipes.finetune import teacher_run
from cap.report import finished_runs
from cap.studies import markdown_table

HEADER = ["teacher", "task", "train sentences", "precision", "runs", "split", "metric", "value"]


def teachers(roots: list[Path], work: Path) -> dict[str, dict]:
    """{teacher folder name: its task, size, precision, number of runs and metrics rows}, over all runs."""
    found: dict[str, dict] = {}
    for root in roots:
        for _, config in finished_runs(root):
            # keys teacher_run reads that runs older than them do not record, at the values they ran with
            cfg = OmegaConf.merge({"data": {"validation_from_train": None, "group_by_length": False}},
                                  OmegaConf.load(config))
            folder = Path(cfg.teacher.path).parent if cfg.teacher.path else work / teacher_run(cfg)[0]
            entry = found.setdefault(folder.name, {
                "task": cfg.task.name, "train sentences": cfg.data.max_train_samples,
                "precision": cfg.trainer.precision, "runs": 0, "folder": folder, "cfg": cfg})
            entry["runs"] += 1
    return found


def rows_of(name: str, entry: dict) -> list[list]:
    metrics = entry["folder"] / "metrics.json"
    common = [name, entry["task"], entry["train sentences"], entry["precision"], entry["runs"]]
    if not metrics.exists():
        return [common + ["", "not found", ""]]
    return [common + [r["split"], k, f"{100 * v:.2f}"] for r in json.loads(metrics.read_text())
            for k, v in r.items() if k not in {"stage", "method", "sparsity", "step", "split"}
            and isinstance(v, (int, float))]


def refit(cfg, work: Path) -> None:
    """Fine-tune the teacher of `cfg` into `work`'s teacher cache, as a run launched from `work` would have. The
    run's config is laid over today's composition of its task and method, so keys added since it ran take their
    defaults."""
    from hydra import compose, initialize_config_dir

    from cap.evaluate import CONF
    from cap.recipes.finetune import ensure_teacher

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        today = compose(config_name="config", overrides=[f"task={cfg.task.name}", f"method={cfg.method.name}"])
    cfg = OmegaConf.merge(today, cfg, {"teacher": {"cache_dir": str(work / cfg.teacher.cache_dir)}})
    ensure_teacher(cfg)


def previous(out: Path) -> dict[str, list[list]]:
    """The rows already in `out`, by teacher, so a teacher no longer on disk keeps its measured rows."""
    kept: dict[str, list[list]] = {}
    if out.exists():
        for line in out.read_text().splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("|") and len(cells) == len(HEADER):
                kept.setdefault(cells[0], []).append(cells)
    return kept


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="folders of runs (searched recursively)")
    parser.add_argument("--work", type=Path, default=Path("."), help="the folder the runs were launched from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fit-missing", action="store_true",
                        help="fine-tune again, into --work, each teacher that is neither there nor in --out (the "
                             "same config as the runs' own teacher: a dense fine-tuning run per teacher)")
    args = parser.parse_args(argv)
    kept = previous(args.out)
    table = []
    found = teachers(args.runs, args.work)
    for name, entry in sorted(found.items(), key=lambda kv: (kv[1]["train sentences"] or float("inf"), kv[0])):
        rows = rows_of(name, entry)
        if rows[0][6] == "not found" and name not in kept and args.fit_missing and not entry["cfg"].teacher.path:
            refit(entry["cfg"], args.work)
            rows = rows_of(name, entry)
        if rows[0][6] == "not found" and name in kept:
            rows = [cells[:4] + [entry["runs"]] + cells[5:] for cells in kept[name]]
        table += rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(markdown_table(HEADER, table) + [
        "", "Each teacher is dense fine-tuning (`method=finetune`) on the runs' training subset; `runs`: how many "
        "finished runs under the given folders distilled from it; value in %."]) + "\n")
    print(f"{len(table)} teacher rows written to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
