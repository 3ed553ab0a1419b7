"""Structured export on MiniLM: parameters and CPU latency (batch 32, seq 128) of the dense model and of models
exported at 50 / 70 / 90 % of heads and FFN neurons removed, beside the ratio of remaining encoder FLOPs.

Masks are random (at least one head per layer): latency depends on shapes, not on which units were chosen. Each
export is timed interleaved with the dense model and the median of the per-round ratios is reported
(`interleaved.py`); the dense latency is the median over all rounds.

    python scripts/bench_export.py   -> results/bench/export.json
"""
import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from cap.export import export_pruned, load_pruned
from cap.models import resolve_model_path

from interleaved import forward_ratio

REPO = Path(__file__).resolve().parents[1]
BATCH, SEQ, ROUNDS = 32, 128, 9


def encoder_flops(heads: list[int], neurons: list[int], hidden: int, head_size: int) -> int:
    """Multiply-adds of the encoder for one sequence: Q/K/V/O projections, attention scores and context, FFN.
    Embeddings, LayerNorms and the classifier are left out (they are not pruned)."""
    total = 0
    for h, f in zip(heads, neurons):
        inner = h * head_size
        total += SEQ * (4 * hidden * inner)      # Q, K, V, O projections
        total += 2 * SEQ * SEQ * inner           # scores and context
        total += SEQ * 2 * hidden * f            # FFN in and out
    return total


def main() -> None:
    path = resolve_model_path("minilm")
    dense = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    cfg = dense.config
    layers, n_heads, n_ffn = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    head_size = cfg.hidden_size // n_heads
    dense_flops = encoder_flops([n_heads] * layers, [n_ffn] * layers, cfg.hidden_size, head_size)
    rows, dense_times = [], []
    g = torch.Generator().manual_seed(0)
    for sparsity in (0.5, 0.7, 0.9):
        head_scores, ffn_scores = torch.rand(layers, n_heads, generator=g), torch.rand(layers * n_ffn, generator=g)
        head_mask = torch.ones(layers, n_heads)
        best = head_scores.argmax(1)
        head_scores[torch.arange(layers), best] = 2.0  # protect one head per layer
        head_mask.view(-1)[head_scores.view(-1).argsort()[: int(sparsity * layers * n_heads)]] = 0
        ffn_mask = torch.ones(layers * n_ffn)
        ffn_mask[ffn_scores.argsort()[: int(sparsity * layers * n_ffn)]] = 0
        ffn_mask = ffn_mask.view(layers, n_ffn)
        with tempfile.TemporaryDirectory() as out:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            export_pruned(model, head_mask, ffn_mask, out)
            small = load_pruned(out)
        flops = encoder_flops(head_mask.sum(1).int().tolist(), ffn_mask.sum(1).int().tolist(), cfg.hidden_size,
                              head_size)
        t = forward_ratio(dense, small, BATCH, SEQ, ROUNDS)
        dense_times.append(t["baseline_s"])
        rows.append({"sparsity": sparsity, "parameters": sum(p.numel() for p in small.parameters()),
                     "latency_s": round(t["candidate_s"], 4), "latency_ratio": round(t["ratio"], 3),
                     "ratio_range": [round(r, 3) for r in t["ratio_range"]],
                     "flops_ratio": round(flops / dense_flops, 3),
                     "latency_over_flops": round(t["ratio"] / (flops / dense_flops), 2)})
        print(f"{sparsity:.0%}: params {rows[-1]['parameters']:,}  latency ratio {rows[-1]['latency_ratio']:.3f}  "
              f"encoder FLOPs ratio {rows[-1]['flops_ratio']:.3f}  (latency/FLOPs {rows[-1]['latency_over_flops']})")
    result = {"model": "all-MiniLM-L6-v2", "batch": BATCH, "seq": SEQ, "threads": torch.get_num_threads(),
              "rounds": ROUNDS, "dense": {"parameters": sum(p.numel() for p in dense.parameters()),
                                          "latency_s": round(statistics.median(dense_times), 4)},
              "exported": rows,
              "note": "latency_ratio: median over rounds of export/dense, timed back to back in each round; FLOPs "
                      "ratio counts the encoder only; latency includes embeddings and the classifier"}
    out = REPO / "results" / "bench" / "export.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
