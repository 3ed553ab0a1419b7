"""Run `python -m cap` and record what this process holds, to compare the ranks of a launch with a 1-process run.

    torchrun --nproc_per_node 2 tests/helpers/distributed_check.py OUT task=sst2 method=cap_f ...   # OUT/rank0.pt, rank1.pt
    python tests/helpers/distributed_check.py OUT task=sst2 method=cap_f ...                      # the reference, rank0.pt

Every rank saves OUT/rank<r>.pt: `snapshots`, each encoded bank snapshot [N, H] (float32, before bank storage) in
encoding order; `selections`, each CAP-f choice {head_mask [L, A], ffn_mask [L, F]}; `movement_masks`, CAP-m's
boolean masks at the final level {matrix name: [out, in]}; `draw_seeds`, the seeds its extra examples were drawn
with; `writes`, every path it opened for writing, renamed to, made or removed (Python audit events: files the Rust
side of safetensors writes show up through the rename that publishes them, or not at all). tests/test_distributed.py
reads them; the run dir itself is the ordinary one.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch


def record_into(record: dict) -> None:
    """Wrap the functions whose results the check compares, so that each call also lands in `record`."""
    import cap.banks
    import cap.recipes.cap_f
    import cap.teacher
    import cap.trainer
    from cap.pruning.movement import MovementScores

    encode, choose, draw, fold = (cap.banks.forward_pass, cap.recipes.cap_f.choose_units,
                                  cap.trainer.draw_extra_idx, MovementScores.fold)

    def forward_pass(*args, **kwargs):  # bank snapshots: `vectors`, or the teacher pass's `fic`
        out = encode(*args, **kwargs)
        record["snapshots"] += [out[k].detach().cpu().clone() for k in ("vectors", "fic") if k in out]
        return out

    def choose_units(*args, **kwargs):
        new, importance = choose(*args, **kwargs)
        record["selections"].append({k: v.clone() for k, v in new.items()})
        return new, importance

    def draw_extra_idx(n_items, n_reps, extra_examples, generator):
        record["draw_seeds"].append(generator.initial_seed())
        return draw(n_items, n_reps, extra_examples, generator)

    def fold_scores(scores):
        record["movement_masks"] = {k: v.cpu() for k, v in scores.masks().items()}
        fold(scores)

    cap.banks.forward_pass = cap.teacher.forward_pass = forward_pass
    cap.recipes.cap_f.choose_units = choose_units
    cap.trainer.draw_extra_idx = draw_extra_idx
    MovementScores.fold = fold_scores


def record_writes(record: dict) -> None:
    def hook(event: str, args: tuple) -> None:
        if event == "open":
            target, mode, flags = args
            if not (any(c in mode for c in "wax+") if isinstance(mode, str)
                    else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
                return
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            target = args[1] if event == "os.rename" else args[0]
        else:
            return
        if isinstance(target, (str, bytes, os.PathLike)):
            record["writes"].append(os.path.abspath(os.fsdecode(target)))

    sys.addaudithook(hook)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    record = {"snapshots": [], "selections": [], "movement_masks": None, "draw_seeds": [], "writes": []}
    record_into(record)
    record_writes(record)
    sys.argv = [sys.argv[0], *sys.argv[2:]]  # what Hydra parses: the overrides
    runpy.run_module("cap", run_name="__main__", alter_sys=True)  # exactly `python -m cap`
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
