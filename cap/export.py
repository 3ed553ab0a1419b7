"""Export a CAP-f run, or a CAP-m / CAP-soft run with prune.granularity=structured, as a physically smaller model
(spec §5.1, Q19).

Masked heads lose their Q/K/V rows and their columns of the attention output projection; masked FFN neurons lose
their row of the FFN input and column of the FFN output. The output biases stay, so the exported model computes
exactly what the masked one did. Stock Hugging Face modules are shrunk in place (BertSelfAttention reshapes with
-1 heads, so fewer heads need no new code); a layer left with no head gets `NoHeads`.

    python -m cap.export <run_dir> --stage 0.9 [--out DIR]      # CAP-f: a stage
    python -m cap.export <run_dir> [--out DIR]                  # CAP-m / CAP-soft, structured (done by the run)
    model = cap.export.load_pruned(DIR)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from cap.io import crash_point, publish_dir
from cap.pruning.structured import encoder_layers


class NoHeads(nn.Module):
    """Stands in for the self-attention of a layer whose heads were all pruned: an empty context [B, T, 0]."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone())
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, columns].clone())
    linear.in_features = len(columns)


def shrink(model: nn.Module, heads: list[list[int]], neurons: list[list[int]]) -> nn.Module:
    """Keep, in layer l, the heads `heads[l]` and the FFN neurons `neurons[l]` (index lists); in place."""
    for layer, kept_heads, kept_neurons in zip(encoder_layers(model), heads, neurons):
        attention = layer.attention.self
        size = attention.attention_head_size
        rows = torch.tensor([h * size + i for h in kept_heads for i in range(size)], dtype=torch.long)
        _keep_columns(layer.attention.output.dense, rows)
        if kept_heads:
            for linear in (attention.query, attention.key, attention.value):
                _keep_rows(linear, rows)
            attention.num_attention_heads = len(kept_heads)
            attention.all_head_size = len(rows)
        else:
            layer.attention.self = NoHeads()
        kept = torch.tensor(kept_neurons, dtype=torch.long)
        _keep_rows(layer.intermediate.dense, kept)
        _keep_columns(layer.output.dense, kept)
    model.config.cap_pruned_heads = [len(h) for h in heads]
    model.config.cap_pruned_neurons = [len(n) for n in neurons]
    return model


def export_pruned(model, head_mask: torch.Tensor, ffn_mask: torch.Tensor, out_dir, tokenizer=None) -> Path:
    """Save `model` without the units masked by `head_mask` [L, A] and `ffn_mask` [L, F] (1 keep, 0 pruned).

    The model must be the masked model's weights without the mask hooks; it is modified in place. The folder
    appears complete or not at all: it is written beside `out_dir`, then renamed."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "cap_export.json").exists():
        raise FileExistsError(f"{out_dir} holds files that are not an earlier export: export to a new folder")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    before = sum(p.numel() for p in model.parameters())
    heads = [torch.nonzero(row).flatten().tolist() for row in head_mask]
    neurons = [torch.nonzero(row).flatten().tolist() for row in ffn_mask]
    shrink(model, heads, neurons)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    summary = {"kind": "structured", "heads": heads, "neurons_per_layer": [len(n) for n in neurons],
               "parameters_before": before, "parameters_after": sum(p.numel() for p in model.parameters())}
    (tmp / "cap_export.json").write_text(json.dumps(summary) + "\n")
    crash_point("export_written")
    publish_dir(tmp, out_dir)
    return out_dir


def load_pruned(path) -> nn.Module:
    """Load an exported model with one call: the stock class, shrunk to the saved shapes, weights loaded strictly."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, config.architectures[0])(config)
    summary = json.loads((path / "cap_export.json").read_text())
    shrink(model, summary["heads"], [list(range(n)) for n in summary["neurons_per_layer"]])
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def main(argv=None) -> Path:
    from safetensors.torch import load_file
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m cap.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", help="CAP-f: the sparsity of the stage to export, e.g. 0.9; none for a "
                        "structured CAP-m / CAP-soft run")
    parser.add_argument("--out", type=Path, default=None, help="default: <run_dir>/export[/<stage>]")
    args = parser.parse_args(argv)
    stages = args.run_dir / "stages"
    if args.stage is None:
        stage, out = args.run_dir, args.out or args.run_dir / "export"
        if not ((stage / "masks.safetensors").exists() and (stage / "model" / "config.json").exists()):
            sys.exit(f"error: {args.run_dir} is not a finished CAP-m / CAP-soft run with prune.granularity=structured "
                     "(masks.safetensors beside model/); for a CAP-f run give --stage (element-wise runs are saved "
                     "compact in sparse/ instead)")
    else:
        stage = stages / f"{float(args.stage):g}"
        out = args.out or args.run_dir / "export" / stage.name
        if not (stage / "DONE").exists():  # written last: a stage without it was cut short
            present = sorted(p.name for p in stages.glob("*") if (p / "DONE").exists()) if stages.is_dir() else []
            sys.exit(f"error: {args.run_dir} has no finished stage {args.stage}; finished stages: "
                     f"{', '.join(present) or 'none'}")
    masks = load_file(str(stage / "masks.safetensors"))
    config = json.loads((stage / "model" / "config.json").read_text())
    auto = AutoModelForQuestionAnswering if "QuestionAnswering" in config["architectures"][0] \
        else AutoModelForSequenceClassification
    model = auto.from_pretrained(stage / "model")
    tokenizer = None
    if (stage / "model" / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(stage / "model")
    out = export_pruned(model, masks["head_mask"], masks["ffn_mask"], out, tokenizer=tokenizer)
    print(f"exported {out}")
    return out


if __name__ == "__main__":
    main()
