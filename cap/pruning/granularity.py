"""Structured scores for movement pruning (`prune.granularity=structured`): one score per attention head and one per
FFN neuron, shared by every weight the unit owns, so that the pruned model can be made physically smaller
(`cap.export.shrink`, as for CAP-f) and run faster; `element` keeps the paper's one score per weight.

A head's score masks its rows of Q, K and V and its columns of the attention output projection; a neuron's score
masks its row of the FFN input and its column of the FFN output. Biases are not masked: a masked head's context is
then its value bias and a masked neuron's activation act(bias), but both meet zero columns of the next projection,
so the masked model computes what the shrunk one does (which drops those rows, columns and biases).

The score is a parameter of one parametrization per unit group (the query's for heads, the FFN input's for
neurons); the other matrices read it, so the straight-through gradient it gets is the sum of ∂L/∂W_eff ⊙ W over all
the weights it masks. Top-K counts units per layer (`unit_counts`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

GRANULARITIES = ("element", "structured")  # prune.granularity


@dataclass(frozen=True)
class LayerUnits:
    """The prunable units of one encoder layer: `heads` heads of `head_size` rows, each masking `head_entries`
    matrix entries (Q, K, V rows and attention-output columns), and `neurons` FFN neurons of `neuron_entries`."""
    heads: int
    head_size: int
    head_entries: int
    neurons: int
    neuron_entries: int

    @classmethod
    def of(cls, layer: nn.Module) -> LayerUnits:
        attention, out = layer.attention.self, layer.attention.output.dense
        size = attention.attention_head_size
        qkv = sum(m.in_features for m in (attention.query, attention.key, attention.value))
        return cls(attention.num_attention_heads, size, size * (qkv + out.out_features),
                   layer.intermediate.dense.out_features,
                   layer.intermediate.dense.in_features + layer.output.dense.out_features)

    @property
    def entries(self) -> int:
        return self.heads * self.head_entries + self.neurons * self.neuron_entries


def unit_counts(keep: float, units: LayerUnits) -> tuple[int, int]:
    """(heads, neurons) that Top-K at keep fraction `keep` keeps in a layer: the nearest whole number of heads to
    keep·heads, then the number of neurons that brings the layer's kept matrix entries nearest keep·(all of them).
    So structured and element Top-K at one keep fraction remove the same number of encoder linear weights, to half a
    neuron per layer; a layer may keep no head (`cap.export` gives it `NoHeads`)."""
    heads = int(keep * units.heads + 0.5)
    budget = keep * units.entries - heads * units.head_entries
    return heads, min(max(int(budget / units.neuron_entries + 0.5), 0), units.neurons)


class UnitScores:
    """One layer's head or neuron scores: `mask(criterion, level)` gives the units' binary mask [n] (1 keep),
    straight-through to the scores; the parameter lives in the owning parametrization, `owner`. `binarizers`:
    (Top-K of the k largest, the soft threshold with its floor of int(0.005·n)+1 units), `cap.pruning.movement`'s."""

    def __init__(self, kind: str, units: LayerUnits, binarizers: tuple):
        self.kind, self.units, (self._topk, self._threshold) = kind, units, binarizers
        self.size = units.head_size if kind == "heads" else 1  # rows (or columns) per unit
        self.owner: UnitMaskedWeight | None = None

    @property
    def scores(self) -> nn.Parameter:
        return self.owner.scores

    def mask(self, criterion: str, level: float) -> Tensor:
        if criterion == "soft":
            return self._threshold(self.scores, level)
        heads, neurons = unit_counts(level, self.units)
        return self._topk(self.scores, heads if self.kind == "heads" else neurons)


class UnitMaskedWeight(nn.Module):
    """The parametrization W -> M ⊙ W where M repeats a unit mask over each unit's rows (`axis` 0) or columns
    (`axis` 1). The first one made for a `UnitScores` owns its parameter `scores` [n]; the others read it."""

    def __init__(self, units: UnitScores, axis: int, state, init: float, across: int):
        super().__init__()
        self.axis, self._units, self._state = axis, [units], [state]  # lists: not registered as submodules
        self.entries_per_score = units.size * across  # entries of this matrix that one score masks
        self.owns_scores = units.owner is None
        if self.owns_scores:
            count = units.units.heads if units.kind == "heads" else units.units.neurons
            self.scores = nn.Parameter(torch.full((count,), float(init)))
            units.owner = self

    @property
    def units(self) -> UnitScores:
        return self._units[0]

    def unit_scores(self) -> Tensor:
        return self.units.scores

    def unit_mask(self) -> Tensor:
        state = self._state[0]
        return self.units.mask(state.criterion, state.level)

    def mask(self, weight: Tensor) -> Tensor:
        """The mask of this matrix, shaped like `weight`."""
        rows = self.unit_mask().repeat_interleave(self.units.size).to(weight.dtype)
        return (rows[:, None] if self.axis == 0 else rows[None, :]).expand_as(weight)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask(weight)


def structured_parametrizations(layer: nn.Module, state, init: float, binarizers: tuple) -> list[UnitMaskedWeight]:
    """The parametrizations of one layer's six matrices, in `cap.pruning.movement.PRUNED_MODULES` order (query, key,
    value, attention output, FFN in, FFN out); `state` is the `MovementScores` (criterion, level)."""
    units = LayerUnits.of(layer)
    heads, neurons = (UnitScores(kind, units, binarizers) for kind in ("heads", "neurons"))
    attention = layer.attention.self
    matrices = [(attention.query, heads, 0), (attention.key, heads, 0), (attention.value, heads, 0),
                (layer.attention.output.dense, heads, 1), (layer.intermediate.dense, neurons, 0),
                (layer.output.dense, neurons, 1)]
    return [UnitMaskedWeight(u, axis, state, init, linear.weight.size(1 - axis)) for linear, u, axis in matrices]


def weighted_quantile(scores: list[Tensor], weights: list[int], q: float) -> float:
    """The smallest score s such that the scores <= s carry at least the fraction q of the total weight (each
    tensor's entries weigh `weights[i]`): the structured scores' quantile in matrix entries, not in units."""
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    weight = torch.cat([torch.full((s.numel(),), float(w), device=flat.device) for s, w in zip(scores, weights)])
    order = flat.argsort()
    cumulative = weight[order].cumsum(0)
    index = int(torch.searchsorted(cumulative, q * cumulative[-1]))
    return float(flat[order[min(index, flat.numel() - 1)]])
