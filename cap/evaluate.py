"""Score a saved model on a task's eval splits, as training did, and time it on this machine.

    python -m cap.evaluate <path> [key=value ...] [--stage S] [--predict] [--out DIR] [--tokenizer T]

<path>: a Hugging Face checkpoint, a CAP-f stage (stages/<s>/), an export (export/<s>/), an export's ONNX file
(export/<s>/model.onnx, model.int8.onnx: run by ONNX Runtime), a compact sparse checkpoint (sparse/) or a run dir (its
final model, or --stage). The overrides are training's: `task=`, `data.eval_split=`,
`data.max_eval_samples=`, ... default to the run's config when <path> is a run or inside one, so the same subsample is
scored. Rows go to <out>/metrics.json (default <path>/eval/, for an ONNX file eval-<name>/ beside it); --predict also writes <out>/predictions/<split>/: the
GLUE server's <TASK>.tsv, or SQuAD's predictions.json ({id: answer}).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cap.artifacts import Artifact, check_task, find_artifact, load_model, measure, tokenizer_path
from cap.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
CARRIED = ("seed", "trainer.eval_batch_size", "trainer.precision")  # with every data.* key: what training scored
NAMED_LABELS = ("mnli", "qnli", "rte")  # the GLUE server takes these tasks' label names, the others' ids / scores


def override_key(override: str) -> str:
    """`+data.x=1` -> `data.x`."""
    return re.sub(r"^[+~]+", "", override.split("=", 1)[0]).strip()


def compose_config(overrides: list[str], run_config: Path | None) -> DictConfig:
    """conf/ composed with `overrides`; the keys that decide what is scored and how (the task, `data.*`, the seed
    of the subsample, the eval batch size and precision) default to the run's values, where the run set them."""
    from hydra import compose, initialize_config_dir

    from cap.cli import check
    from cap.config import lookup

    given = {override_key(o) for o in overrides}
    run = OmegaConf.load(run_config) if run_config else None
    if run is not None and OmegaConf.select(run, "task.name") is None:
        run = None  # not a cap run's config
    if run is None and "task" not in given:
        raise UserError("no run config (.hydra/config.yaml) in or above the path: say which task to score it on "
                        "(task=sst2, ...) and, for training's subsample, its data keys (data.max_eval_samples=...)")
    task = [] if run is None or "task" in given else [f"task={run.task.name}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*task, *overrides])
    check(cfg)
    if run is not None:
        keys = [*CARRIED, *(f"data.{k}" for k in run.get("data", {}))]
        for key in keys:
            parent, _, name = key.rpartition(".")
            node = OmegaConf.select(run, parent) if parent else run
            if (key in given or lookup(key) is None or node is None or name not in node
                    or OmegaConf.is_interpolation(node, name)):  # an interpolation follows this composition
                continue
            OmegaConf.update(cfg, key, OmegaConf.select(run, key), merge=False)
    return cfg


def load_eval_data(cfg: DictConfig, tokenizer):
    """The eval splits exactly as training built them (`load_task_data`, same keys). The training set is read (the
    split `data.validation_from_train` carves depends on it) but only one of its rows tokenised."""
    from cap.data import load_task_data

    d = cfg.data
    return load_task_data(
        cfg.task.name, tokenizer, data_dir=d.dir, train_split=d.train_split,
        eval_splits=OmegaConf.to_object(d.eval_split) if OmegaConf.is_config(d.eval_split) else d.eval_split,
        max_seq_length=d.max_seq_length, max_train_samples=1, max_eval_samples=d.max_eval_samples, seed=d.seed,
        doc_stride=d.doc_stride, max_query_length=d.max_query_length, cache_dir=d.cache_dir,
        validation_from_train=d.validation_from_train,
    )


class ForwardTimer:
    """Times every forward call of `model` (a batch): (batch size, seconds), read and reset by `take`."""

    def __init__(self, model):
        import torch

        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.batches: list[tuple[int, float]] = []
        self._start = (0, 0.0)
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after)]

    def _before(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.sync()
        self._start = (len(ids) if ids is not None else 0, time.perf_counter())

    def _after(self, module, args, output):
        self.sync()
        self.batches.append((self._start[0], time.perf_counter() - self._start[1]))

    def take(self) -> dict[str, float]:
        """`examples_per_s` (sentences or sentence pairs; SQuAD: 384-token windows) and the median
        `latency_ms_per_batch` of the calls since the last `take`."""
        batches, self.batches = self.batches, []
        seconds = sum(s for _, s in batches)
        return {"examples_per_s": round(sum(n for n, _ in batches) / seconds, 2) if seconds else None,
                "latency_ms_per_batch": round(1000 * statistics.median(s for _, s in batches), 3) if batches else None}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def glue_submission(folder: Path, spec, split: str, preds, ids) -> Path:
    """The GLUE server's file for one split: `index<TAB>prediction`, one row per example; MNLI's two test sets as
    MNLI-m.tsv and MNLI-mm.tsv in one folder."""
    name = ("MNLI-mm" if "mismatched" in split else "MNLI-m") if spec.name == "mnli" else spec.glue_dir
    if spec.is_regression:
        values = [f"{float(p):.3f}" for p in preds]
    else:
        values = [spec.label_names[int(p)] if spec.name in NAMED_LABELS else str(int(p)) for p in preds]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.tsv"
    path.write_text("\n".join(["index\tprediction", *(f"{i}\t{v}" for i, v in zip(ids, values))]) + "\n")
    return path


def write_predictions(out: Path, data, split: str, preds) -> Path:
    from cap.io import write_json_atomic

    if data.spec.is_qa:
        path = out / "predictions" / split / "predictions.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, preds)
        return path
    examples = data.eval_examples[split]
    ids = examples["source_idx" if "source_idx" in examples.column_names else "idx"]
    family = re.sub(r"_(mis)?matched$", "", split)  # MNLI's matched and mismatched files go side by side
    return glue_submission(out / "predictions" / family, data.spec, split, preds, ids)


def save_rows(path: Path, rows: list[dict]) -> None:
    """Add `rows` to metrics.json; a row replaces an earlier one of the same (artifact, task, split)."""
    from cap.io import read_json, write_json_atomic

    def key(r):
        return r.get("artifact"), r.get("task"), r.get("split")

    new = {key(r): r for r in rows}
    merged = [new.pop(key(r), r) for r in read_json(path, [])]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, merged + list(new.values()))


def describe(row: dict, metrics: dict[str, float]) -> str:
    scores = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    sparsity = "unknown" if row["sparsity"] is None else f"{row['sparsity']:.4f}"
    return (f"  {row['split']}: {scores or 'no labels: predictions only'} ({row['examples']} examples; sparsity "
            f"{sparsity}, {row['nonzero_parameters']:,} of {row['parameters']:,} parameters nonzero; "
            f"{row['examples_per_s']} examples/s, {row['latency_ms_per_batch']} ms per batch of {row['batch_size']} "
            f"on {row['device']})")


def evaluate(path, overrides=(), *, stage: str | None = None, out=None, predict: bool = False,
             tokenizer: str | None = None) -> list[dict]:
    """Score the artifact at `path` on every eval split of the composed config; returns the metrics.json rows."""
    artifact: Artifact = find_artifact(path, stage)
    if artifact.note:
        print(artifact.note)
    cfg = compose_config(list(overrides), artifact.run_config)
    from cap.data import get_task

    spec = get_task(cfg.task.name)
    check_task(artifact, spec)
    tokenizer_source = tokenizer_path(artifact, tokenizer)

    import tempfile

    from transformers import DataCollatorWithPadding

    from cap.evaluation import predict_split, score
    from cap.models import load_tokenizer
    from cap.methods import metric_rows, training_arguments
    from cap.trainer import CAPTrainer, LossWeights

    tok = load_tokenizer(tokenizer_source)
    data = load_eval_data(cfg, tok)
    model = load_model(artifact)
    measured = measure(model)
    given = Path(path)
    out = Path(out) if out else given / "eval" if given.is_dir() else given.parent / f"eval-{given.stem}"
    run = OmegaConf.load(artifact.run_config) if artifact.run_config else None
    fields = {"artifact": str(artifact.path), "kind": artifact.kind, "task": spec.name,
              **({"method": run.method.name} if run is not None and OmegaConf.select(run, "method.name") else {})}
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(cfg, Path(scratch), [])
        # CAPTrainer, as training: it keeps evaluation in the order given (the plain Trainer's group_by_length
        # would shuffle it) and computes the task loss alone
        trainer = CAPTrainer(model=model, args=args, data_collator=DataCollatorWithPadding(tok), processing_class=tok,
                             weights=LossWeights())
        timer = ForwardTimer(model)
        for split in data.evals:
            preds, references = predict_split(trainer, data, split)
            metrics = {} if references is None else score(spec.name, preds, references)
            row = metric_rows({split: metrics}, **fields)[0]
            rows.append({**row, "examples": len(data.eval_examples[split]), "sparsity": measured["sparsity_entries"],
                         **measured, **timer.take(), "batch_size": cfg.trainer.eval_batch_size,
                         "device": device_name(args.device)})
            lines.append(describe(rows[-1], metrics))
            if predict:
                print(f"predictions: {write_predictions(out, data, split, preds)}")
        timer.remove()
    print("\n".join([f"{artifact.kind} {artifact.path} on {spec.name}:", *lines]))
    save_rows(out / "metrics.json", rows)
    print(f"rows added to {out / 'metrics.json'}")
    return rows


def main(argv=None) -> list[dict]:
    from hydra.errors import CompactHydraException

    parser = argparse.ArgumentParser(prog="python -m cap.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a checkpoint, stage, export, sparse checkpoint or run dir")
    parser.add_argument("overrides", nargs="*", help="key=value as for training (task=, data.eval_split=, ...)")
    parser.add_argument("--stage", default=None, help="of a run dir: the CAP-f stage to score, e.g. 0.9")
    parser.add_argument("--out", type=Path, default=None, help="where metrics.json goes (default: <path>/eval)")
    parser.add_argument("--predict", action="store_true", help="also write the predictions of every split")
    parser.add_argument("--tokenizer", default=None, help="for an artifact saved without one: a folder or hub name")
    args = parser.parse_intermixed_args(argv)
    try:
        return evaluate(args.path, args.overrides, stage=args.stage, out=args.out, predict=args.predict,
                        tokenizer=args.tokenizer)
    except (UserError, CompactHydraException) as err:
        from cap.cli import explain

        message = explain(err) if isinstance(err, CompactHydraException) else str(err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
