"""Does movement pruning make MiniLM faster? CPU latency of the pruned model over the dense one, for each
`prune.granularity` at 50 and 90 % of the encoder matrices' entries removed (the same count at both granularities),
at batch 1 and 32, seq 128, 2 threads.

- structured: the run's export (`cap.export`: the masked heads and FFN neurons removed), run as exported;
- element: the folded model, its scattered zeros run dense (the honest baseline: stock PyTorch gains nothing).

Scores are random (Top-K per layer or per matrix): latency depends on shapes, not on which units are kept. The two
models are timed interleaved, and the median of the per-round ratios is reported (`interleaved.py`).

    python scripts/bench_movement_speed.py   -> results/bench/movement_speed.json
"""
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from cap.export import export_pruned, load_pruned
from cap.models import resolve_model_path
from cap.pruning.movement import MovementScores

from interleaved import forward_ratio

REPO = Path(__file__).resolve().parents[1]
SEQ, THREADS, BATCHES, SPARSITIES, ROUNDS = 128, 2, (1, 32), (0.5, 0.9), 9
MIN_SECONDS = 0.3  # a measurement repeats the forward pass until the dense model has taken about this long


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def pruned_model(build, granularity: str, sparsity: float, seed: int = 0):
    """(the model to time, the fraction of encoder matrix entries kept): `build()` pruned by Top-K on random scores
    at keep fraction 1 - sparsity, folded, and for the structured granularity exported and loaded back."""
    model = build()
    scores = MovementScores.attach(model, "topk", granularity=granularity)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in scores.score_parameters():
            s.copy_(torch.randn(s.shape, generator=g))
    scores.set_level(1 - sparsity)
    kept = 1 - scores.sparsity()["entries"]
    units = scores.unit_masks() if granularity == "structured" else None
    scores.fold()
    if units is None:
        return model.eval(), kept
    with tempfile.TemporaryDirectory() as out:
        export_pruned(model, units["head_mask"], units["ffn_mask"], out)
        return load_pruned(out), kept


def timed_pair(dense, pruned, batch: int, rounds: int = ROUNDS, seq: int = SEQ) -> dict:
    """The row's timing fields: `forward_ratio` of the two models, rounded."""
    t = forward_ratio(dense, pruned, batch, seq, rounds, MIN_SECONDS, seed=batch)
    return {"latency_ratio": round(t["ratio"], 3), "ratio_range": [round(r, 3) for r in t["ratio_range"]],
            "dense_latency_s": round(t["baseline_s"], 5), "pruned_latency_s": round(t["candidate_s"], 5),
            "calls_per_round": t["calls_per_round"]}


def main() -> None:
    torch.set_num_threads(THREADS)
    path = resolve_model_path("minilm")

    def build():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    dense = build()
    rows = []
    for granularity in ("structured", "element"):
        for sparsity in SPARSITIES:
            pruned, kept = pruned_model(build, granularity, sparsity)
            for batch in BATCHES:
                timing = timed_pair(dense, pruned, batch)
                rows.append({"granularity": granularity, "sparsity": sparsity, "batch": batch,
                             "latency_ratio": timing.pop("latency_ratio"),
                             "parameters_ratio": round(n_parameters(pruned) / n_parameters(dense), 3),
                             "encoder_matrix_entries_kept": round(kept, 4), **timing})
                r = rows[-1]
                print(f"{granularity:10s} {sparsity:.0%} batch {batch:2d}: latency ratio {r['latency_ratio']:.3f} "
                      f"(rounds {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f})  parameters ratio "
                      f"{r['parameters_ratio']:.3f}", flush=True)
    result = {"model": "all-MiniLM-L6-v2", "seq": SEQ, "threads": torch.get_num_threads(), "rounds": ROUNDS,
              "rows": rows,
              "note": "latency_ratio: median over rounds of pruned/dense, timed back to back in each round; "
                      "parameters_ratio: parameters the timed model holds (element: all, its zeros run dense) over "
                      "the dense model's; embeddings and classifier are never pruned"}
    out = REPO / "results" / "bench" / "movement_speed.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
