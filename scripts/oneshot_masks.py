"""How much does a fine-tuned model lose to unstructured masks alone? Per-matrix Top-K masks (the CAP-m binarizer)
chosen once by |W| (magnitude) and by random scores, on the 72 encoder matrices, then evaluated with no retraining.
A floor for movement-pruning runs: masks chosen by scores that carry no signal behave like the random ones.

    CAP_DATA_DIR=../shared/data python scripts/oneshot_masks.py runs/teachers/<key>/model --task sst2 \
        --out results/minilm-sst2/oneshot_masks.json
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing cap

from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,  # noqa: E402
                          Trainer, TrainingArguments)

from cap.data import load_task_data  # noqa: E402
from cap.evaluation import evaluate_task  # noqa: E402
from cap.pruning.movement import prunable_linears, topk_mask  # noqa: E402
from cap.sparse import encoder_sparsity  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a fine-tuned checkpoint (e.g. a cached teacher's model/ dir)")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5, 0.3, 0.1], help="Top-K keep fractions")
    parser.add_argument("--data-dir", default=os.environ.get("CAP_DATA_DIR"),
                        help="default: $CAP_DATA_DIR; else the hub")
    parser.add_argument("--eval-split", help="default: the task's validation split(s)")
    parser.add_argument("--seed", type=int, default=0, help="for the random scores")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    data = load_task_data(args.task, tokenizer, data_dir=args.data_dir, eval_splits=args.eval_split,
                          max_train_samples=1)
    dense = {name: linear.weight.detach().clone() for name, linear in prunable_linears(model)}
    generator = torch.Generator().manual_seed(args.seed)
    criteria = {"magnitude": lambda w: w.abs(), "random": lambda w: torch.rand(w.shape, generator=generator)}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, data_collator=DataCollatorWithPadding(tokenizer),
                          args=TrainingArguments(tmp, per_device_eval_batch_size=128, report_to=[], use_cpu=True))
        rows = [{"criterion": "dense", "keep": 1.0, **evaluate_task(trainer, data)}]
        for criterion, scores in criteria.items():
            for keep in args.keep:
                with torch.no_grad():
                    for name, linear in prunable_linears(model):
                        linear.weight.copy_(dense[name] * topk_mask(scores(dense[name]), keep))
                rows.append({"criterion": criterion, "keep": keep,
                             "matrix_sparsity": round(encoder_sparsity(model)["matrix_sparsity"], 6),
                             **evaluate_task(trainer, data)})
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "task": args.task, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
