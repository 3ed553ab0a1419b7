"""Paper-vs-ours tables and plots from finished runs.

    python -m cap.report <dir> [<dir> ...] [--out results/NAME] [--paper results/paper/cap_aaai2022.yaml] [--wandb]

Every run dir under the given dirs (one holding metrics.json and its config in .hydra/config.yaml or config.yaml)
is read; the rows are grouped by (task, method, ablation, sparsity, split, metric) and averaged over seeds, then set
beside the paper's numbers, each with its source and the source's kind (paper, reprint, issue, abstract). Only runs
whose configs differ in the seed alone (and in keys that cannot change a result: paths, logger, checkpointing) are
averaged: runs of one method that differ in anything else are kept apart, one row each, and the `settings` column
names the keys that set them apart. Writes <out>/table.md, <out>/table.csv and one <out>/<task>.png per task. All
scores are in percent (ours are stored in [0, 1], the paper prints percent); delta = ours - paper, in points.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from cap.errors import UserError
from cap.methods import nominal_sparsity
from cap.studies import figure, fmt, markdown_table, mean_std
from cap.tracking import ablation_labels, has_wandb_key

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "results" / "paper" / "cap_aaai2022.yaml"
PAPER_METRICS = {"acc": "accuracy", "F1": "f1", "EM": "exact_match"}
MOVEMENT = ("cap_m", "cap_soft")
METHOD_ORDER = ("finetune", "cap_f", "cap_m", "cap_soft")
KEY = ("task", "method", "ablation", "sparsity", "split", "metric")  # a cell of the paper's tables
GROUP = (*KEY, "model", "settings")  # what seeds are averaged over
COLUMNS = (*GROUP, "n", "seeds", "sparsity_measured", "mean", "std", "paper", "delta", "source", "source_kind")
# where a paper number was read: the CAP paper itself, another paper or README printing it, a GitHub issue quoting
# it, the abstract
SOURCE_KINDS = ("paper", "reprint", "issue", "abstract")
NOT_METRICS = {"stage", "method", "step", "sparsity", "split"}
# config keys that cannot change a result: runs differing only in these (and the seed) are averaged together
NEUTRAL_KEYS = {"seed", "data.dir", "data.cache_dir", "teacher.cache_dir", "trainer.resume", "trainer.keep_checkpoints",
                "trainer.logging_steps", "trainer.save_steps", "trainer.save_total_limit", "trainer.num_workers"}
NEUTRAL_PREFIXES = ("logger.", "hydra.")


def ablation(cfg: DictConfig) -> str:
    """A short label of what `cfg` switches off: "full", "-PrC,-SnC", "baseline", ... (the W&B ablation tags)."""
    method = cfg.method.name
    if not (REPO / "conf" / "method" / f"{method}.yaml").exists():
        raise UserError(f"method '{method}' has no conf/method/{method}.yaml: not a cap run?")
    return "full" if method == "finetune" else ",".join(ablation_labels(cfg))


def row_sparsity(cfg: DictConfig, row: dict) -> float:
    """The sparsity a row's run aimed at, so seeds group together: the config's nominal one for CAP-m and CAP-soft
    (`cap.recipes.nominal_sparsity`; a CAP-soft run without a target: its measured level to 0.01), the recorded one
    otherwise (each CAP-f step, 0 for fine-tuning)."""
    if cfg.method.name in MOVEMENT:
        nominal = nominal_sparsity(cfg)
        return round(nominal, 4) if nominal is not None else round(row["sparsity"], 2)
    return round(row["sparsity"], 4)


def run_settings(cfg: DictConfig) -> dict[str, str]:
    """The run's config as flat `key: value` text, without the keys that cannot change a result (NEUTRAL_KEYS).

    Read unresolved, as Hydra saved it: `data.seed: ${seed}` is the same setting in every seed of a sweep. Numbers
    compare as numbers (`11000` = `11000.0`), and a key set to null as a key that is absent (`settings_labels`)."""
    def number(x):
        if isinstance(x, list):
            return [number(v) for v in x]
        return int(x) if isinstance(x, float) and x.is_integer() else x

    def flat(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from flat(value, f"{prefix}{key}.")
        elif node is not None:
            yield prefix[:-1], node if isinstance(node, str) else json.dumps(number(node), separators=(",", ":"))

    return {key: value for key, value in flat(OmegaConf.to_container(cfg, resolve=False))
            if key not in NEUTRAL_KEYS and not key.startswith(NEUTRAL_PREFIXES)}


def finished_runs(root: Path):
    """(metrics rows, config path) of every dir under `root` holding metrics.json rows and a config."""
    for metrics in sorted(root.rglob("metrics.json")):
        config = next((p for p in (metrics.parent / ".hydra" / "config.yaml", metrics.parent / "config.yaml")
                       if p.exists()), None)
        try:
            rows = json.loads(metrics.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{metrics}: not valid JSON ({err}); rerun the run or delete the file") from None
        if config is not None and rows:
            yield rows, config


def collect_runs(dirs) -> list[dict]:
    """One record per (finished run, eval row, metric) under `dirs`; `value` as stored, in [0, 1]."""
    records, seen = [], set()
    for root in map(Path, dirs):
        if not root.is_dir():
            raise UserError(f"{root}: no such directory")
        found = 0
        for rows, config in finished_runs(root):
            found += 1
            if config.resolve() in seen:  # the same run reached from two of the given dirs
                continue
            seen.add(config.resolve())
            cfg = OmegaConf.load(config)
            for key in ("task.name", "method.name", "seed"):
                if OmegaConf.select(cfg, key) is None:
                    raise UserError(f"{config}: no `{key}`; is this a cap run config?")
            if cfg.method.name in MOVEMENT:  # one row per epoch: the run's result is the last epoch
                last = max(r["stage"] for r in rows)
                rows = [r for r in rows if r["stage"] == last]
            label = ablation(cfg)
            model = Path(str(OmegaConf.select(cfg, "model.name_or_path", default="unknown"))).name
            settings = run_settings(cfg)
            for row in rows:
                for metric, value in row.items():
                    if metric in NOT_METRICS or metric.startswith("sparsity_") or not isinstance(value, (int, float)):
                        continue
                    records.append({"task": cfg.task.name, "method": cfg.method.name, "ablation": label,
                                    "sparsity": row_sparsity(cfg, row), "split": row["split"], "metric": metric,
                                    "value": float(value), "seed": cfg.seed, "sparsity_measured": row["sparsity"],
                                    "model": model, "config": settings, "run": str(config.parent)})
        if not found:
            raise UserError(f"{root}: no finished run (a dir with metrics.json rows and .hydra/config.yaml or "
                            "config.yaml); pass a run dir or a folder above run dirs")
    return records


def _series(method: str, abl: str) -> tuple:  # the table's and the legend's order
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method, abl != "full", abl


def _order(row: dict) -> tuple:
    return row["task"], *_series(row["method"], row["ablation"]), *(row[k] for k in GROUP[3:])


def settings_labels(records: list[dict]) -> dict[str, str]:
    """For each run, the settings that set it apart from the other runs of its series (task, method, ablation,
    model): "" where they all share one config but the seed, else e.g. "data.max_train_samples=64"."""
    series: dict[tuple, dict[str, dict]] = {}
    for r in records:
        series.setdefault((r["task"], r["method"], r["ablation"], r["model"]), {})[r["run"]] = r["config"]
    labels = {}
    for configs in series.values():
        keys = set().union(*configs.values())
        varying = sorted(k for k in keys if len({c.get(k, "null") for c in configs.values()}) > 1)
        for run, config in configs.items():
            labels[run] = ",".join(f"{k}={config.get(k, 'null')}" for k in varying)
    return labels


def summarize(records: list[dict]) -> list[dict]:
    """Mean and sample std (None for one seed) over seeds, in percent, per (task, method, ablation, sparsity, ...):
    over runs that differ in the seed alone; runs of other settings are rows of their own (`settings`)."""
    labels = settings_labels(records)
    records = [{**r, "settings": labels[r["run"]]} for r in records]
    split = sorted({(r["task"], r["method"], r["ablation"], r["model"]) for r in records if r["settings"]})
    for task, method, abl, model in split:
        print(f"note: {task} {method} ({abl}, {model}): runs with different settings are kept apart "
              "(the `settings` column), not averaged", file=sys.stderr)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in GROUP), []).append(r)
    rows = []
    for key, group in groups.items():
        mean, std = mean_std(100 * r["value"] for r in group)
        rows.append({**dict(zip(GROUP, key)), "n": len(group), "seeds": sorted(r["seed"] for r in group),
                     "sparsity_measured": statistics.mean(r["sparsity_measured"] for r in group),
                     "mean": mean, "std": std})
    return sorted(rows, key=_order)


def load_paper(path) -> dict:
    """The paper yaml, checked: {"entries": cells (our metric names), "sources": {key: {url, where}}, "retention"}."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (--paper)") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise UserError(f"{path}: expected a mapping with an `entries:` list (see results/paper/cap_aaai2022.yaml)")
    sources = doc.get("sources") or {}
    cells, retention = doc["entries"], doc.get("retention") or []
    for i, e in enumerate(cells + retention):
        where = f"{path}: {'entries' if i < len(cells) else 'retention'} item {e}"
        needs = ("task", "method", "sparsity", "value", "source") + (("split", "metric") if i < len(cells) else ())
        missing = [k for k in needs if not isinstance(e, dict) or k not in e]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}")
        if (e["value"] is None) != (e["source"] is None):
            raise UserError(f"{where}: value and source must both be set or both be null")
        if e["value"] is not None and not isinstance(e["value"], (int, float)):
            raise UserError(f"{where}: value must be a number (percent, as the paper prints it)")
        if e["source"] is not None and e["source"] not in sources:
            raise UserError(f"{where}: source '{e['source']}' is not a key of `sources:`")
        if i < len(cells) and e["metric"] not in PAPER_METRICS:
            raise UserError(f"{where}: metric '{e['metric']}': use one of {', '.join(PAPER_METRICS)}")
    for key, source in sources.items():
        if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS or "url" not in source:
            raise UserError(f"{path}: source '{key}': give its url and its kind, one of {', '.join(SOURCE_KINDS)}")
    seen = set()
    for e in cells:
        key = (e["task"], e["method"], e.get("ablation", "full"), float(e["sparsity"]), e["split"], e["metric"])
        if e["value"] is not None and key in seen:
            raise UserError(f"{path}: two sourced cells for {', '.join(map(str, key))}: keep one, name the other "
                            "source in its note")
        seen.add(key)
    model = (doc.get("paper") or {}).get("model", "paper")
    entries = [{**e, "ablation": e.get("ablation", "full"), "metric": PAPER_METRICS[e["metric"]], "model": model,
                "settings": "", "sparsity": round(float(e["sparsity"]), 4)} for e in cells]
    return {"entries": entries, "sources": sources, "retention": retention}


def comparable_split(task: str, split: str) -> str:
    """The paper's split a run's split stands in for: offline MNLI/QQP runs evaluate on `heldout` (train rows)."""
    if split == "heldout":
        return "validation_matched" if task == "mnli" else "validation"
    return split


def join_paper(summary: list[dict], paper: dict) -> list[dict]:
    """`summary` rows with the paper's value, delta and source key; the paper's sourced cells of our tasks that no
    run of ours matches are added with n = 0."""
    cells = {tuple(e[k] for k in KEY): e for e in paper["entries"] if e["value"] is not None}

    def kind(entry):
        return entry and paper["sources"][entry["source"]]["kind"]

    used, rows = set(), []
    for row in summary:
        key = (*(row[k] for k in KEY[:4]), comparable_split(row["task"], row["split"]), row["metric"])
        entry = cells.get(key)
        used.add(key)
        rows.append({**row, "paper": entry and entry["value"], "source": entry and entry["source"],
                     "source_kind": kind(entry), "delta": entry and row["mean"] - entry["value"]})
    for key, e in cells.items():
        if key not in used and e["task"] in {r["task"] for r in summary}:
            rows.append({**{k: e[k] for k in GROUP}, "n": 0, "seeds": [], "sparsity_measured": None, "mean": None,
                         "std": None, "paper": e["value"], "delta": None, "source": e["source"],
                         "source_kind": kind(e)})
    return sorted(rows, key=_order)


def _num(x, fmt=".2f") -> str:
    return "" if x is None else format(x, fmt)


def to_markdown(rows: list[dict], paper: dict) -> str:
    sources = paper["sources"]
    header = ["task", "method", "ablation", "sparsity", "measured", "split", "metric", "model", "settings", "n",
              "ours (%)", "paper (%)", "delta", "source", "kind"]
    lines = markdown_table(header, ([
        r["task"], r["method"], r["ablation"], f"{r['sparsity']:g}", _num(r["sparsity_measured"], ".3f"),
        r["split"], r["metric"], r["model"], r["settings"], r["n"],
        "" if r["mean"] is None else fmt(r["mean"], r["std"]), _num(r["paper"], ".1f"), _num(r["delta"], "+.2f"),
        f"[{r['source']}]({sources[r['source']]['url']})" if r["source"] else "", r["source_kind"] or ""]
        for r in rows))
    notes = ["", ("ours: mean ± sample std over seeds (n runs), percent; delta = ours - paper, in points; sparsity: "
                  "the run's target (measured: the recorded level); settings: the config keys that set a row's runs "
                  "apart from other runs of the same method (empty: none; runs are averaged only when their configs "
                  "differ in the seed alone); paper cells without a source are not shown; kind: where the paper's "
                  "number was read (paper: the CAP paper; reprint: another paper or README printing it; issue: a "
                  "GitHub issue quoting it; abstract: the abstract).")]
    if any(r["split"] == "heldout" for r in rows):
        notes.append("heldout: held-out *train* rows (offline MNLI/QQP, ../shared/data/README.md), set beside the "
                     "paper's dev-set numbers: not the same data.")
    notes += [f"- {c['task']} at sparsity {c['sparsity']:g}: CAP keeps {c['value']} % of BERT-base's score "
              f"([{c['source']}]({sources[c['source']]['url']}))" for c in paper["retention"] if c["value"] is not None]
    notes += ["", "Sources:"] + [f"- {k} ({s['kind']}): {s['url']}: {s.get('where', '')}" for k, s in sources.items()]
    return "\n".join(lines + notes) + "\n"


def _cells(row: dict, sources: dict) -> list:
    """A row as CSV / W&B cells: seeds joined, floats to 4 decimals, the source as its URL."""
    url = row["source"] and sources[row["source"]]["url"]
    cells = {**row, "seeds": ",".join(map(str, row["seeds"])), "source": url}
    return [round(cells[c], 4) if isinstance(cells[c], float) else cells[c] for c in COLUMNS]


def write_csv(rows: list[dict], path: Path, sources: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(_cells(r, sources) for r in rows)


def plot(rows: list[dict], task: str, path: Path) -> Path:
    """Metric vs sparsity for `task`, one panel per (paper split, metric): ours as lines with std error bars, one colour
    per (method, ablation, settings) and one line style per model, the paper's cells as stars."""
    rows = [{**r, "panel": (comparable_split(task, r["split"]), r["metric"])} for r in rows if r["task"] == task]
    panels = sorted({r["panel"] for r in rows})
    series = sorted({(r["method"], r["ablation"], r["settings"]) for r in rows}, key=lambda s: (*_series(*s[:2]), s[2]))
    models = sorted({r["model"] for r in rows if r["n"]})
    fig = figure(5 * len(panels), 4)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        starred = set()
        for i, (method, abl, settings) in enumerate(series):
            label = (method if abl == "full" else f"{method} ({abl})") + (f" [{settings}]" if settings else "")
            mine = sorted((r for r in rows if (r["panel"], r["method"], r["ablation"], r["settings"])
                           == (panel, method, abl, settings)), key=lambda r: r["sparsity"])
            for j, model in enumerate(models):
                ours = [r for r in mine if r["mean"] is not None and r["model"] == model]
                if ours:
                    ax.errorbar([r["sparsity"] for r in ours], [r["mean"] for r in ours], color=f"C{i}", marker="o",
                                linestyle=("-", "--", ":", "-.")[j % 4], yerr=[r["std"] or 0 for r in ours],
                                capsize=3, label=f"ours: {label}" + (f", {model}" if len(models) > 1 else ""))
            theirs = [r for r in mine if r["paper"] is not None]
            if theirs and (method, abl) not in starred:  # one set of stars per method and ablation
                starred.add((method, abl))
                kinds = "/".join(sorted({r["source_kind"] for r in theirs if r.get("source_kind")}))
                ax.scatter([r["sparsity"] for r in theirs], [r["paper"] for r in theirs], color=f"C{i}", marker="*",
                           s=160, edgecolors="black", zorder=3,
                           label=f"paper{f' ({kinds})' if kinds else ''}: {label.split(' [')[0]}")
        ours = sorted({r["split"] for r in rows if r["panel"] == panel and r["n"]} - {panel[0]})
        ax.set(xlabel="sparsity", ylabel=f"{panel[1]} (%)",
               title=f"{task} {panel[0]}" + (f" (ours: {', '.join(ours)})" if ours else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def log_wandb(rows: list[dict], sources: dict, pngs: list[Path], group: str, out: Path) -> None:
    """The table and plots into the active W&B run, or a new run of job_type "report" under `out`/wandb (offline
    without an API key)."""
    import os

    import wandb


    started = wandb.run is None
    if started:
        if not os.environ.get("WANDB_MODE") and not has_wandb_key():
            os.environ["WANDB_MODE"] = "offline"
        wandb.init(project="cap", job_type="report", group=group, name=f"report-{group}", dir=str(out))
    table = wandb.Table(columns=list(COLUMNS), data=[_cells(r, sources) for r in rows])
    wandb.log({"report/table": table, **{f"report/{p.stem}": wandb.Image(str(p)) for p in pngs}})
    print(f"W&B: table and plots logged to run {wandb.run.name} ({wandb.run.dir})")
    if started:
        wandb.finish()


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m cap.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run dirs, or folders searched for run dirs")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<name of the first dir>")
    parser.add_argument("--paper", type=Path, default=PAPER, help=f"the paper's numbers (default: {PAPER.name})")
    parser.add_argument("--wandb", action="store_true", help="log table and plots to W&B (offline without a key)")
    parser.add_argument("--group", default=None, help="W&B group (default: the first dir's name)")
    args = parser.parse_args(argv)
    name = args.dirs[0].resolve().name
    out = args.out or Path("results") / name
    paper = load_paper(args.paper)
    rows = join_paper(summarize(collect_runs(args.dirs)), paper)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(to_markdown(rows, paper))
    write_csv(rows, out / "table.csv", paper["sources"])
    pngs = [plot(rows, task, out / f"{task}.png") for task in sorted({r["task"] for r in rows})]
    print(f"report written to {out}/: table.md, table.csv, {', '.join(p.name for p in pngs)}")
    if args.wandb or ("wandb" in sys.modules and sys.modules["wandb"].run is not None):
        log_wandb(rows, paper["sources"], pngs, args.group or name, out)
    return out


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")
