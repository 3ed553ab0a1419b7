"""Pruning components. `structured`: CAP-f head/FFN masks, first-order importance, schedule and selection."""
from cap.pruning.structured import (
    Packing,
    StructuredMasks,
    compute_importance,
    encoder_layers,
    mask_shapes,
    normalize_by_layer,
    pruning_targets,
    select_heads,
    select_neurons,
)

__all__ = [
    "Packing",
    "StructuredMasks",
    "compute_importance",
    "encoder_layers",
    "mask_shapes",
    "normalize_by_layer",
    "pruning_targets",
    "select_heads",
    "select_neurons",
]
