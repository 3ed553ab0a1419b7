"""Export a CAP-f run, or a CAP-m / CAP-soft run with prune.granularity=structured, as a physically smaller model
(spec §5.1, Q19) that loads with stock transformers.

Masked heads lose their Q/K/V rows and their columns of the attention output projection; masked FFN neurons lose
their row of the FFN input and column of the FFN output. The output biases stay, so the exported model computes
exactly what the masked one did. The export is a `PrunedBertFor...` (`cap/hub/modeling_pruned_bert.py`: stock BERT
modules built at each layer's sizes, a layer left with no head gets `NoHeads`), saved with its modeling file and the
config's `auto_map`, so that a process without `cap` loads it:

    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)
    python -m cap.export <run_dir> --stage 0.9 [--out DIR]      # CAP-f: a stage
    python -m cap.export <run_dir> [--out DIR]                  # CAP-m / CAP-soft, structured (done by the run)
    model = cap.export.load_pruned(DIR)                         # the same classes, imported from cap
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from cap.hub.modeling_pruned_bert import (PrunedBertConfig, PrunedBertForQuestionAnswering,
                                          PrunedBertForSequenceClassification, PrunedBertModel)
from cap.io import crash_point, publish_dir
from cap.model_card import CardSettings, write_card
from cap.pruning.structured import encoder_layers

PRUNED_CLASSES = {"ForSequenceClassification": PrunedBertForSequenceClassification,
                  "ForQuestionAnswering": PrunedBertForQuestionAnswering, "Model": PrunedBertModel}


def pruned_class(architecture: str):
    """The PrunedBert class for a stock architecture name (BertForSequenceClassification, BertModel, ...)."""
    for suffix, cls in PRUNED_CLASSES.items():
        if architecture.endswith(suffix):
            return cls
    raise ValueError(f"{architecture}: exports are made of BERT encoders, with a sequence-classification or "
                     "question-answering head or none")


def pruned_config(config, heads: list[int], neurons: list[int]) -> PrunedBertConfig:
    """`config` (a BERT model's) with the heads and FFN neurons kept per layer, as a PrunedBertConfig."""
    values = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version", "heads_per_layer",
                           "ffn_neurons_per_layer")}
    return PrunedBertConfig(**values, heads_per_layer=heads, ffn_neurons_per_layer=neurons)


def compact_state(model: nn.Module, heads: list[list[int]], neurons: list[list[int]]) -> dict[str, torch.Tensor]:
    """`model`'s weights with, in layer l, only the heads `heads[l]` and FFN neurons `neurons[l]` (index lists)."""
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    names = {id(module): name for name, module in model.named_modules()}
    for layer, kept_heads, kept_neurons in zip(encoder_layers(model), heads, neurons):
        attention = layer.attention.self
        size = attention.attention_head_size
        rows = torch.tensor([h * size + i for h in kept_heads for i in range(size)], dtype=torch.long)
        kept = torch.tensor(kept_neurons, dtype=torch.long)
        selections = [(attention.query, rows, None), (attention.key, rows, None), (attention.value, rows, None),
                      (layer.attention.output.dense, None, rows), (layer.intermediate.dense, kept, None),
                      (layer.output.dense, None, kept)]
        for linear, out_rows, in_columns in selections:
            prefix = names[id(linear)]
            if out_rows is not None:
                state[f"{prefix}.weight"] = state[f"{prefix}.weight"][out_rows]
                if f"{prefix}.bias" in state:
                    state[f"{prefix}.bias"] = state[f"{prefix}.bias"][out_rows]
            else:
                state[f"{prefix}.weight"] = state[f"{prefix}.weight"][:, in_columns]
        if not kept_heads:
            for name in ("query", "key", "value"):
                for kind in ("weight", "bias"):
                    state.pop(f"{names[id(getattr(attention, name))]}.{kind}", None)
    return state


def pruned_model(model: nn.Module, head_mask: torch.Tensor, ffn_mask: torch.Tensor) -> nn.Module:
    """A PrunedBert model holding the units of `model` that `head_mask` [L, A] and `ffn_mask` [L, F] keep."""
    heads = [torch.nonzero(row).flatten().tolist() for row in head_mask]
    neurons = [torch.nonzero(row).flatten().tolist() for row in ffn_mask]
    config = pruned_config(model.config, [len(h) for h in heads], [len(n) for n in neurons])
    small = pruned_class(model.config.architectures[0] if model.config.architectures else type(model).__name__)(
        config)
    small.load_state_dict(compact_state(model, heads, neurons), strict=True)
    return small.eval()


def export_pruned(model, head_mask: torch.Tensor, ffn_mask: torch.Tensor, out_dir, tokenizer=None,
                  card: tuple | None = None) -> Path:
    """Save `model` without the units masked by `head_mask` [L, A] and `ffn_mask` [L, F] (1 keep, 0 pruned), as a
    PrunedBert model with its modeling file (`trust_remote_code`), and, given `card` (the run's config and the
    stage's metrics rows), its model card. `model` holds the masked model's weights, without the mask hooks; it is
    not modified. The folder appears complete or not at all: it is written beside `out_dir`, then renamed."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "cap_export.json").exists():
        raise FileExistsError(f"{out_dir} holds files that are not an earlier export: export to a new folder")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    small = pruned_model(model, head_mask, ffn_mask)
    small.save_pretrained(tmp)  # also copies modeling_pruned_bert.py and writes auto_map (register_for_auto_class)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    summary = {"kind": "structured", "heads": [torch.nonzero(row).flatten().tolist() for row in head_mask],
               "neurons_per_layer": small.config.ffn_neurons_per_layer,
               "parameters_before": sum(p.numel() for p in model.parameters()),
               "parameters_after": sum(p.numel() for p in small.parameters())}
    (tmp / "cap_export.json").write_text(json.dumps(summary) + "\n")
    if card is not None:
        write_card(tmp, *card, kind="export")
    crash_point("export_written")
    publish_dir(tmp, out_dir)
    return out_dir


ONNX_TOLERANCE = 1e-4  # largest |logit difference| accepted between ONNX Runtime and PyTorch (fp32)


def export_onnx(folder, quantize: bool = False, seed: int = 0) -> dict[str, float]:
    """Write `model.onnx` into the export `folder` (dynamic batch size and sequence length), and with `quantize` a
    dynamically quantized copy, `model.int8.onnx` (onnxruntime's quantizer, int8 weights); each is run with ONNX
    Runtime on random inputs, padding included, against the PyTorch export. The fp32 file must agree to
    ONNX_TOLERANCE; the largest differences are returned and written into `cap_export.json`."""
    import os

    import numpy as np
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(folder)
    model = load_pruned(folder)
    # the plain attention graph (MatMul, Softmax, MatMul): the SDPA one traces with NaN guards and ran 5-15 %
    # slower in ONNX Runtime (measured ad hoc: MiniLM at 90 %, seq 128, batch 1 and 32, 2 threads)
    model.set_attn_implementation("eager")
    names = ["start_logits", "end_logits"] if isinstance(model, PrunedBertForQuestionAnswering) else ["logits"]
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size

    def sample(batch: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, vocab, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0  # a padded row
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    tmp = folder / ".model.onnx.tmp"
    torch.onnx.export(model, (), str(tmp), kwargs=sample(2, 8), input_names=inputs, output_names=names,
                      dynamic_shapes={name: {0: batch, 1: length} for name in inputs}, dynamo=True)
    graph = onnx.load(str(tmp))
    del graph.graph.value_info[:]  # shapes traced at the sample's size; onnxruntime infers its own
    onnx.save(graph, str(tmp))
    os.replace(tmp, folder / "model.onnx")
    files = ["model.onnx"]
    if quantize:
        # a layer left without heads or FFN neurons has a weight with no rows or columns: onnxruntime's quantizer
        # gives such a product garbage scales, so it stays fp32 (it computes nothing but its bias anyway)
        empty = {t.name for t in graph.graph.initializer if 0 in t.dims}
        skip = [node.name for node in graph.graph.node if empty & set(node.input)]
        quantize_dynamic(str(folder / "model.onnx"), str(folder / ".model.int8.onnx.tmp"), weight_type=QuantType.QInt8,
                         nodes_to_exclude=skip)
        os.replace(folder / ".model.int8.onnx.tmp", folder / "model.int8.onnx")
        files.append("model.int8.onnx")
    check = sample(3, 13)  # another batch size and length than the export's sample
    with torch.no_grad():
        out = model(**check)
    expected = np.concatenate([getattr(out, name).numpy().ravel() for name in names])
    diffs = {}
    for name in files:
        session = onnxruntime.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        got = np.concatenate([o.ravel() for o in session.run(names, {k: v.numpy() for k, v in check.items()})])
        diffs[name] = float(np.abs(got - expected).max())
    if diffs["model.onnx"] > ONNX_TOLERANCE:
        raise RuntimeError(f"{folder / 'model.onnx'} differs from the PyTorch export by {diffs['model.onnx']:.2e} "
                           f"(> {ONNX_TOLERANCE})")
    summary = json.loads((folder / "cap_export.json").read_text())
    summary["onnx_max_abs_diff"] = diffs
    (folder / "cap_export.json").write_text(json.dumps(summary) + "\n")
    return diffs


def load_pruned(path) -> nn.Module:
    """Load an export with the PrunedBert classes of `cap.hub` (what trust_remote_code loads from the folder's own
    copy of them)."""
    from cap.errors import UserError

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != PrunedBertConfig.model_type:
        raise UserError(f"{path} is an export of an older cap (a stock config with cap_pruned_heads): export the "
                        "run's stage again with python -m cap.export")
    return pruned_class(config["architectures"][0]).from_pretrained(path).eval()


def main(argv=None) -> Path:
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from cap.artifacts import run_config
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m cap.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", help="CAP-f: the sparsity of the stage to export, e.g. 0.9; none for a "
                        "structured CAP-m / CAP-soft run")
    parser.add_argument("--out", type=Path, default=None, help="default: <run_dir>/export[/<stage>]")
    parser.add_argument("--onnx", action="store_true", help="also model.onnx (dynamic batch and length), checked "
                        "against PyTorch with ONNX Runtime")
    parser.add_argument("--quantize", choices=["int8"], help="with --onnx: also model.int8.onnx, dynamically "
                        "quantized (int8 weights)")
    args = parser.parse_args(argv)
    if args.quantize and not args.onnx:
        parser.error("--quantize int8 quantizes the ONNX file: add --onnx")
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
    if args.onnx:
        for name, diff in export_onnx(out, quantize=args.quantize == "int8").items():
            print(f"  {name}: largest |logit difference| from PyTorch {diff:.2e}")
    config = run_config(stage)
    if config is not None:  # the card, once the ONNX files it tells how to load are there
        done = stage / "DONE"
        rows = json.loads(done.read_text())["rows"] if done.exists() else json.loads(
            (stage / "metrics.json").read_text())
        rows = [r for r in rows if r.get("stage") == rows[-1].get("stage")] if rows else []
        write_card(out, CardSettings.from_config(OmegaConf.load(config)), rows, kind="export")
    return out


if __name__ == "__main__":
    main()
