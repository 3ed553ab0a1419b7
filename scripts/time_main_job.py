"""Run the README's main job on the old path and with the new defaults, one after the other, for each seed, and
record wall times and metrics in results/main_job.json (rewritten after every run: a killed study resumes).

The old path is the code path every committed study before the speed work ran: fp32, random batches in dataset
order, the teacher recomputed in every update (`trainer.precision=fp32 data.group_by_length=false
teacher.cache_outputs=false`). Each run starts from an empty teacher cache, so its time includes fine-tuning the
teacher, as on a new machine.

    CAP_DATA_DIR=../shared/data python scripts/time_main_job.py [--seeds 42 1 2]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from cap.precision import cpu_bf16, cpu_name, resolve

ARGS = ["experiment=quickstart"]
PATHS = {"old": ["trainer.precision=fp32", "data.group_by_length=false", "teacher.cache_outputs=false"], "new": []}
OUT = REPO / "results" / "main_job.json"


def run(seed: int, path: str) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="cap-main-job-"))
    seed_arg = [] if seed == 42 else [f"seed={seed}"]  # 42: the config's own seed, the README's command as it is
    command = [*ARGS, *seed_arg, *PATHS[path]]
    start = time.perf_counter()
    # a fresh teacher cache, so the time includes fine-tuning the teacher as on a new machine
    subprocess.run([sys.executable, "-m", "cap", *command, f"hydra.run.dir={run_dir}",
                    f"teacher.cache_dir={run_dir / 'teachers'}"], cwd=REPO, check=True)
    wall = time.perf_counter() - start
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    return {"seed": seed, "path": path, "command": "python -m cap " + " ".join(command),
            "precision": next(line.split(":")[1].strip() for line in saved.splitlines()
                              if line.strip().startswith("precision:")),
            "wall_seconds": round(wall, 1),
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "teacher_metrics": [row for p in (run_dir / "teachers").glob("*/metrics.json")
                                for row in json.loads(p.read_text())]}


def summary(runs: list[dict]) -> dict:
    """Per path: accuracy at each sparsity and the teacher's, mean ± std over seeds; wall times; new/old ratios of
    the wall time per seed (the two runs of a seed ran back to back)."""
    out = {}
    for path in PATHS:
        rows = [r for r in runs if r["path"] == path]
        if not rows:
            continue
        acc = {}
        for r in rows:
            for m in r["metrics"]:
                acc.setdefault(str(m["sparsity"]), []).append(m["accuracy"])
            for m in r["teacher_metrics"]:
                acc.setdefault("teacher", []).append(m["accuracy"])
        out[path] = {"seeds": [r["seed"] for r in rows], "precision": sorted({r["precision"] for r in rows}),
                     "wall_seconds": [r["wall_seconds"] for r in rows],
                     "accuracy_mean": {k: round(statistics.mean(v), 4) for k, v in acc.items()},
                     "accuracy_std": {k: round(statistics.stdev(v), 4) if len(v) > 1 else None
                                      for k, v in acc.items()}}
    pairs = [(o, n) for o in runs for n in runs if o["path"] == "old" and n["path"] == "new" and o["seed"] == n["seed"]]
    if pairs:
        ratios = [n["wall_seconds"] / o["wall_seconds"] for o, n in pairs]
        out["wall_new_over_old"] = {"per_seed": [round(x, 3) for x in ratios],
                                    "median": round(statistics.median(ratios), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--redo", choices=list(PATHS), nargs="*", default=[],
                        help="run these paths again for --seeds (after a change to the code), replacing their runs")
    a = parser.parse_args()
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    runs = [r for r in result.get("runs", []) if "path" in r]  # runs of this script's kind, kept on resume
    redo = [(seed, path) for seed in a.seeds for path in a.redo]
    # a redone run is replaced once it finishes (the file keeps the old one until then)
    stale = [r for r in runs if (r["seed"], r["path"]) in redo and not r.get("redone")]
    for seed in a.seeds:
        for path in PATHS:
            if any(r["seed"] == seed and r["path"] == path and r not in stale for r in runs):
                continue
            runs = [r for r in runs if (r["seed"], r["path"]) != (seed, path)]
            runs.append({**run(seed, path), **({"redone": True} if (seed, path) in redo else {})})
            result = {
                "command": "python -m cap " + " ".join(ARGS),
                "old_path": " ".join(PATHS["old"]),
                "runs": runs,
                "summary": summary(runs),
                "machine": {"cpu": cpu_name(), "cpu_bf16": cpu_bf16(),
                            "auto_precision": resolve("auto", torch.device("cpu"))[0], "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.cuda.is_available()},
            }
            OUT.write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(result["summary"], indent=1), flush=True)


if __name__ == "__main__":
    main()
