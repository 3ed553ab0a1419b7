"""Compact checkpoints of unstructured-pruned models: each mostly-zero matrix is stored as a bitmask of its
nonzero entries plus their values (safetensors only, no pickle). `load_sparse` gives back the exact model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MASK, VALUES = ".__mask", ".__values"


def sparse_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices whose bitmask + nonzero values take fewer bytes than the dense tensor are stored as
    `<key>.__mask` (uint8, packed bits of the flattened nonzero pattern) and `<key>.__values` [nnz]."""
    packed = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        nonzero = tensor != 0
        compact_bytes = -(-tensor.numel() // 8) + int(nonzero.sum()) * tensor.element_size()
        if tensor.dim() == 2 and compact_bytes < tensor.numel() * tensor.element_size():
            packed[key + MASK] = torch.from_numpy(np.packbits(nonzero.flatten().numpy()))
            packed[key + VALUES] = tensor[nonzero]
        else:
            packed[key] = tensor
    return packed


def dense_state_dict(packed: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Inverse of `sparse_state_dict`; `shapes` gives the shape of every compact matrix."""
    state = {k: v for k, v in packed.items() if not k.endswith((MASK, VALUES))}
    for key, shape in shapes.items():
        numel = int(np.prod(shape))
        nonzero = torch.from_numpy(np.unpackbits(packed[key + MASK].numpy())[:numel].astype(bool))
        values = packed[key + VALUES]
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[nonzero] = values
        state[key] = dense.view(shape)
    return state


def save_sparse(model, out_dir, *, tokenizer=None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # what load_sparse rebuilds
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    state = model.state_dict()
    packed = sparse_state_dict(state)
    shapes = {k[: -len(MASK)]: list(state[k[: -len(MASK)]].shape) for k in packed if k.endswith(MASK)}
    save_file(packed, str(out_dir / "sparse.safetensors"), metadata={"shapes": json.dumps(shapes)})
    summary = {"dense_bytes": sum(t.numel() * t.element_size() for t in state.values()),
               "compact_bytes": sum(t.numel() * t.element_size() for t in packed.values()),
               **encoder_sparsity(model)}
    (out_dir / "cap_sparse.json").write_text(json.dumps(summary, indent=1) + "\n")
    return out_dir


def load_sparse(path, model_class=None):
    """The model saved by `save_sparse`, bit-exact, in eval mode: one call."""
    import transformers
    from safetensors import safe_open

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = model_class or getattr(transformers, config.architectures[0])
    model = model_class(config)
    with safe_open(str(path / "sparse.safetensors"), "pt") as f:
        shapes = json.loads((f.metadata() or {}).get("shapes", "{}"))
    model.load_state_dict(dense_state_dict(load_file(str(path / "sparse.safetensors")), shapes), strict=True)
    return model.eval()


def encoder_sparsity(model) -> dict[str, float]:
    """Fraction of zeros in the encoder's weight matrices, and over all encoder parameters."""
    params = dict(model.base_model.encoder.named_parameters())
    matrices = [p for p in params.values() if p.dim() == 2]
    zeros = sum(int((p == 0).sum()) for p in matrices)
    return {"matrix_sparsity": zeros / sum(p.numel() for p in matrices),
            "encoder_sparsity": zeros / sum(p.numel() for p in params.values())}
