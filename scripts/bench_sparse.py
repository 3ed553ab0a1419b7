"""Compact sparse checkpoints on MiniLM: size of `save_sparse` against the dense `save_pretrained` file at
50 / 90 / 97 % of the encoder matrix entries zeroed (per-matrix magnitude pruning, as a stand-in for movement
masks: the file size depends on how many entries are zero, not on which).

    python scripts/bench_sparse.py   -> results/bench/sparse.json
"""
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from cap.models import resolve_model_path
from cap.pruning.movement import prunable_linears
from cap.sparse import encoder_sparsity, save_sparse

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    rows = []
    for sparsity in (0.5, 0.9, 0.97):
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
        with torch.no_grad():
            for _, linear in prunable_linears(model):
                w = linear.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
        with tempfile.TemporaryDirectory() as out:
            model.save_pretrained(Path(out) / "dense")
            save_sparse(model, Path(out) / "sparse")
            dense = (Path(out) / "dense" / "model.safetensors").stat().st_size
            compact = (Path(out) / "sparse" / "sparse.safetensors").stat().st_size
            summary = json.loads((Path(out) / "sparse" / "cap_sparse.json").read_text())
        encoder = {n: p for n, p in model.state_dict().items() if ".encoder." in n}
        encoder_dense = sum(t.numel() * t.element_size() for t in encoder.values())
        nonzero = sum(int((t != 0).sum()) * t.element_size() + (t.numel() + 7) // 8
                      for n, t in encoder.items() if t.dim() == 2)
        other = sum(t.numel() * t.element_size() for n, t in encoder.items() if t.dim() != 2)
        rows.append({"target": sparsity, "matrix_sparsity": round(encoder_sparsity(model)["matrix_sparsity"], 4),
                     "dense_file_bytes": dense, "compact_file_bytes": compact,
                     "whole_model_ratio": round(compact / dense, 3),
                     "encoder_only_ratio": round((nonzero + other) / encoder_dense, 3),
                     "dense_state_bytes": summary["dense_bytes"], "compact_state_bytes": summary["compact_bytes"]})
        r = rows[-1]
        print(f"{sparsity:.0%}: measured {r['matrix_sparsity']:.4f}  compact/dense whole model "
              f"{r['whole_model_ratio']:.3f}  encoder only {r['encoder_only_ratio']:.3f}")
    result = {"model": "all-MiniLM-L6-v2", "rows": rows,
              "note": "whole_model_ratio: file sizes, embeddings (never pruned) included; encoder_only_ratio: "
                      "bitmask + nonzero values of the encoder matrices plus its dense biases/LayerNorms, "
                      "over the dense encoder"}
    (REPO / "results" / "bench" / "sparse.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
