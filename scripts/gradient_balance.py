"""How CAP's two loss parts pull on the encoder during CAP-f retraining, read from runs' Trainer logs.

    python -m cap experiment=minilm/sst2_reproduction prune.sequence=[0.5,0.7] seed=1 trainer.logging_steps=5 \\
        trainer.keep_checkpoints=true contrast.pooling=cls,auto -m hydra.sweep.dir=multiruns/balance
    python scripts/gradient_balance.py multiruns/balance --out results/minilm-sst2-balance

Every CAP run logs, at each logging step, `grad_norm_task` (the gradient norm of ce·CE + kd·KD w.r.t. the encoder),
`grad_norm_contrast` (of the weighted contrastive terms) and `grad_cosine` (cap/trainer.py). This reads them from
the last checkpoint of every stage of every run under the given dirs (so the runs need
`trainer.keep_checkpoints=true`) and writes balance.json (every logged point, with the run's pooling, the stage and
its dev accuracy) and balance.md (per run and stage: the ratio contrast / task and the cosine, over the first
logging step and over the whole stage, with the stage's dev accuracy). `--from-json` rebuilds balance.md from a
committed balance.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from cap.studies import markdown_table

KEYS = ("grad_norm_task", "grad_norm_contrast", "grad_cosine")


def stage_logs(run_dir: Path) -> list[dict]:
    """The logged gradient-balance points of every stage of a CAP-f run: {stage, step, pooling, *KEYS}."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    points = []
    for stage in sorted((run_dir / "stages").iterdir(), key=lambda p: float(p.name)):
        checkpoints = sorted(stage.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints:
            raise SystemExit(f"{stage}: no checkpoint left; run with trainer.keep_checkpoints=true")
        history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
        points += [{"run": run_dir.name, "pooling": cfg.contrast.pooling, "stage": float(stage.name),
                    "step": entry["step"], **{k: entry[k] for k in KEYS}} for entry in history if KEYS[0] in entry]
    return points


def summarize(points: list[dict]) -> list[dict]:
    rows = []
    for key in sorted({(p["run"], p["pooling"], p["stage"]) for p in points}):
        mine = sorted((p for p in points if (p["run"], p["pooling"], p["stage"]) == key), key=lambda p: p["step"])
        ratios = [p["grad_norm_contrast"] / p["grad_norm_task"] for p in mine]
        rows.append({"run": key[0], "pooling": key[1], "stage": key[2], "points": len(mine),
                     "ratio_first": ratios[0], "ratio_mean": statistics.mean(ratios),
                     "cosine_first": mine[0]["grad_cosine"],
                     "cosine_mean": statistics.mean(p["grad_cosine"] for p in mine),
                     "accuracy": mine[0]["accuracy"]})
    return rows


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="CAP-f run dirs, or folders above them")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from-json", action="store_true", help="rebuild balance.md from <out>/balance.json")
    args = parser.parse_args(argv)
    if args.from_json:
        points = json.loads((args.out / "balance.json").read_text())["points"]
    else:
        runs = sorted({p.parents[2] for d in args.dirs for p in d.rglob("stages/*/DONE")})
        points = []
        for run in runs:
            accuracy = {float(r["sparsity"]): r["accuracy"] for r in json.loads((run / "metrics.json").read_text())
                        if r["split"] == "validation"}
            points += [{**p, "accuracy": accuracy.get(p["stage"])} for p in stage_logs(run)]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "balance.json").write_text(json.dumps({"points": points}, indent=1) + "\n")
    (args.out / "balance.md").write_text(to_markdown(summarize(points)))
    print(f"gradient balance written to {args.out}/: balance.json, balance.md")
    return args.out


def to_markdown(rows: list[dict]) -> str:
    lines = markdown_table(
        ["pooling", "stage", "logged points", "contrast / task, first", "mean", "cosine, first", "mean", "dev acc."],
        ([r["pooling"], f"{r['stage']:g}", r["points"], f"{r['ratio_first']:.2f}", f"{r['ratio_mean']:.2f}",
          f"{r['cosine_first']:+.3f}", f"{r['cosine_mean']:+.3f}",
          "" if r["accuracy"] is None else format(100 * r["accuracy"], ".1f")] for r in rows))
    notes = ["", "contrast / task: grad_norm_contrast / grad_norm_task w.r.t. the encoder's parameters, at the first "
             "logging step of the stage and averaged over the stage; cosine: between the two gradients."]
    return "\n".join(lines + notes) + "\n"


if __name__ == "__main__":
    main()
