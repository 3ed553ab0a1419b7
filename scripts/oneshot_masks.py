"""How much does a fine-tuned model lose to unstructured masks alone? Per-matrix Top-K masks (the CAP-m binarizer)
on the 72 encoder matrices, chosen once and evaluated with no retraining, by
- magnitude: |W|; random: uniform scores;
- movement: the scores CAP-m learns in its dense phase (`--movement-updates` updates of CE on the training set,
  level 1, scores in their own AdamW group as in cap.recipes.movement); `movement_flipped` keeps the lowest of them
  instead, `movement_extremes` removes the largest |S| (both tails alike); and, at `--group-keep`, the movement
  masks on one kind of matrix (e.g. every intermediate.dense) or one layer at a time, the rest dense (rows with
  `only`).
All masks are applied to the checkpoint's own weights. `output_change` is how far a mask moves the matrices'
outputs on `--probe-sentences` training sentences: mean over matrices of ||X (W - M⊙W)ᵀ||² / ||X Wᵀ||², X the
matrix's inputs in the dense model (0: nothing changes, 1: as far as zeroing the matrix; above 1 where the
removed contributions add up instead of cancelling).

    CAP_DATA_DIR=../shared/data python scripts/oneshot_masks.py runs/teachers/<key>/model --task sst2 \
        --out results/minilm-sst2/oneshot_masks.json
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

from cap.data import load_task_data
from cap.evaluation import evaluate_task
from cap.pruning.movement import PRUNED_MODULES, MovementScores, prunable_linears, topk_mask
from cap.sparse import encoder_sparsity

MOVEMENT_ARGS = ("movement_updates", "score_lr", "lr", "batch_size", "max_train_samples", "seed", "group_keep")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a fine-tuned checkpoint (e.g. a cached teacher's model/ dir)")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.1],
                        help="Top-K keep fractions")
    parser.add_argument("--data-dir", default=os.environ.get("CAP_DATA_DIR"),
                        help="default: $CAP_DATA_DIR; else the hub")
    parser.add_argument("--eval-split", help="default: the task's validation split(s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="for the random scores and the order of the movement updates")
    parser.add_argument("--movement-updates", type=int, default=126,
                        help="dense-phase updates that learn the movement scores (default: the dense phase of "
                             "experiment=minilm/sst2_cap_m; 0: no movement criteria)")
    parser.add_argument("--score-lr", type=float, default=1e-2,
                        help="the scores' learning rate (at level 1 it scales S and leaves its ranking alone)")
    parser.add_argument("--lr", type=float, default=3e-5, help="the weights' learning rate while scores learn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train-samples", type=int, default=2000,
                        help="the training subset the scores see (drawn as cap draws it, seed 42)")
    parser.add_argument("--group-keep", type=float, default=0.9,
                        help="keep fraction of the one-group-at-a-time movement masks (0: none)")
    parser.add_argument("--probe-sentences", type=int, default=64, help="training sentences for output_change")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    data = load_task_data(args.task, tokenizer, data_dir=args.data_dir, eval_splits=args.eval_split,
                          max_train_samples=args.max_train_samples)
    collator = DataCollatorWithPadding(tokenizer)
    dense = {name: linear.weight.detach().clone() for name, linear in prunable_linears(model)}
    probe = matrix_inputs(model, data.train, collator, args.probe_sentences)
    generator = torch.Generator().manual_seed(args.seed)
    criteria = {"magnitude": lambda name, w: w.abs(),
                "random": lambda name, w: torch.rand(w.shape, generator=generator)}
    if args.movement_updates:
        movement = movement_scores(args.model, data.train, collator, args)
        criteria.update(movement=lambda name, w: movement[name], movement_flipped=lambda name, w: -movement[name],
                        movement_extremes=lambda name, w: -movement[name].abs())
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, data_collator=collator,
                          args=TrainingArguments(tmp, per_device_eval_batch_size=128, report_to=[], use_cpu=True))
        rows = [{"criterion": "dense", "keep": 1.0, **evaluate_task(trainer, data)}]

        def measure(criterion, keep, only=None):
            with torch.no_grad():
                for name, linear in prunable_linears(model):
                    chosen = only is None or name.split(".", 2)[2] == only or name.startswith(f"{only}.")
                    linear.weight.copy_(dense[name] * topk_mask(criteria[criterion](name, dense[name]), keep)
                                        if chosen else dense[name])
            rows.append({"criterion": criterion, "keep": keep, **({"only": only} if only else {}),
                         "matrix_sparsity": round(encoder_sparsity(model)["matrix_sparsity"], 6),
                         "output_change": round(output_change(model, dense, probe), 6),
                         **evaluate_task(trainer, data)})
            print(json.dumps(rows[-1]), flush=True)

        for criterion in criteria:
            for keep in args.keep:
                measure(criterion, keep)
        if args.movement_updates and args.group_keep:
            layers = sorted({name.split(".")[1] for name in dense}, key=int)
            for only in (*PRUNED_MODULES, *(f"layer.{i}" for i in layers)):  # a kind of matrix, or a layer
                measure("movement", args.group_keep, only)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "task": args.task, "rows": rows,
                                         "movement": {k: getattr(args, k) for k in MOVEMENT_ARGS}}, indent=1) + "\n")


def movement_scores(path, train, collator, args) -> dict[str, torch.Tensor]:
    """The scores S of every prunable matrix after `args.movement_updates` dense updates of CE (a fresh copy of the
    checkpoint; its weights learn too, at `args.lr`, as in CAP-m's dense phase)."""
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path).train()
    scores = MovementScores.attach(model, "topk")
    optimizer = torch.optim.AdamW(scores.param_groups(lr=args.lr, weight_decay=0.0, score_lr=args.score_lr))
    loader = torch.utils.data.DataLoader(model_inputs(train), batch_size=args.batch_size, shuffle=True,
                                         collate_fn=collator)
    done = 0
    while done < args.movement_updates:
        for batch in loader:
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
            done += 1
            if done == args.movement_updates:
                break
    return {name: score.detach().clone() for (name, _), score in zip(scores.linears, scores.score_parameters())}


def model_inputs(train, labels: bool = True):
    keep = ("input_ids", "attention_mask", "token_type_ids") + (("labels",) if labels else ())
    return train.remove_columns([c for c in train.column_names if c not in keep])


@torch.no_grad()
def matrix_inputs(model, train, collator, sentences: int) -> dict[str, torch.Tensor]:
    """The inputs of every prunable matrix (real tokens only, [tokens, in]) on the first `sentences` training ones."""
    seen, linears = {}, prunable_linears(model)
    hooks = [linear.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, args[0]))
             for name, linear in linears]
    inputs = model_inputs(train, labels=False)
    batch = collator([inputs[i] for i in range(min(sentences, len(inputs)))])
    try:
        model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    real = batch["attention_mask"].bool()
    return {name: seen[name][real] for name, _ in linears}


@torch.no_grad()
def output_change(model, dense: dict[str, torch.Tensor], probe: dict[str, torch.Tensor]) -> float:
    """Mean over the prunable matrices of ||X (W_dense - W)ᵀ||² / ||X W_denseᵀ||² (X: the matrix's dense inputs)."""
    ratios = [float((probe[name] @ (dense[name] - linear.weight).T).square().sum()
                    / (probe[name] @ dense[name].T).square().sum()) for name, linear in prunable_linears(model)]
    return sum(ratios) / len(ratios)


if __name__ == "__main__":
    main()
