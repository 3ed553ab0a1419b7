"""CAP-f structured pruning (spec §5.1): head and FFN masks as hooks, first-order importance, schedule, selection.

Masks act on an unmodified Hugging Face BERT-family model (spec Q22). L = layers, A = heads per layer,
F = FFN neurons per layer, all read from the model. A mask entry of 1 keeps a unit, 0 removes it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers (`model.base_model.encoder.layer`) of a BERT-family model."""
    try:
        return model.base_model.encoder.layer
    except AttributeError as error:
        raise TypeError(f"{type(model).__name__} has no base_model.encoder.layer; CAP-f masks need a "
                        "BERT-family model (BertForSequenceClassification, BertForQuestionAnswering, ...)") from error


def mask_shapes(model: nn.Module) -> tuple[int, int, int]:
    """(L, A, F) from the model's modules; every layer must have the same A and F."""
    layers = encoder_layers(model)
    shapes = {(layer.attention.self.num_attention_heads, layer.intermediate.dense.out_features) for layer in layers}
    if len(shapes) != 1:
        raise ValueError(f"layers differ in (heads, FFN neurons): {sorted(shapes)}; [L, A] / [L, F] masks need "
                         "the same shape in every layer")
    heads, neurons = shapes.pop()
    return len(layers), heads, neurons


def _size(linear: nn.Linear, with_bias: bool = True) -> int:
    return linear.weight.numel() + (linear.bias.numel() if with_bias and linear.bias is not None else 0)


class StructuredMasks:
    """`head_mask` [L, A] and `ffn_mask` [L, F] (float32, on the model's device) applied with forward hooks.

    A head's mask scales its context [B, T, d] before the attention output projection, which equals masking its
    attention probabilities after dropout (spec Q22). An FFN mask scales the activation output of
    `layer.intermediate`. The biases of `attention.output.dense` and `output.dense` stay (spec Q19).
    """

    def __init__(self, head_mask: Tensor, ffn_mask: Tensor):
        if head_mask.dim() != 2 or ffn_mask.dim() != 2 or head_mask.size(0) != ffn_mask.size(0):
            raise ValueError(f"expected head_mask [L, A] and ffn_mask [L, F], got {tuple(head_mask.shape)} "
                             f"and {tuple(ffn_mask.shape)}")
        self.head_mask = head_mask.detach().float().clone()
        self.ffn_mask = ffn_mask.detach().float().clone()
        self._handles: list = []
        self._unit_sizes: tuple[Tensor, Tensor, int] | None = None
        # `per_group`: one copy of the masks per group [G, L, X], and each example's group [B] in the next forward
        self._group_masks: tuple[Tensor, Tensor] | None = None
        self.example_groups: Tensor | None = None

    @classmethod
    def from_model(cls, model: nn.Module) -> StructuredMasks:
        """All-ones masks shaped after `model`, on its device (hooks are not registered: call `apply`)."""
        n_layers, n_heads, n_neurons = mask_shapes(model)
        device = encoder_layers(model)[0].intermediate.dense.weight.device
        masks = cls(torch.ones(n_layers, n_heads, device=device), torch.ones(n_layers, n_neurons, device=device))
        masks._unit_sizes = _unit_sizes(model)
        return masks

    @property
    def is_applied(self) -> bool:
        return bool(self._handles)

    def apply(self, model: nn.Module) -> StructuredMasks:
        """Register the hooks on `model` (moving the masks to its device); returns self."""
        if self._handles:
            raise RuntimeError("masks are already applied to a model; call remove() first")
        shape = mask_shapes(model)
        if shape != (*self.head_mask.shape, self.ffn_mask.size(1)):
            raise ValueError(f"masks [L, A]={tuple(self.head_mask.shape)}, F={self.ffn_mask.size(1)} do not fit "
                             f"the model's (L, A, F)={shape}")
        device = encoder_layers(model)[0].intermediate.dense.weight.device
        tracking = self.head_mask.requires_grad
        self.head_mask = self.head_mask.detach().to(device).requires_grad_(tracking)
        self.ffn_mask = self.ffn_mask.detach().to(device).requires_grad_(tracking)
        self._unit_sizes = _unit_sizes(model)
        for index, layer in enumerate(encoder_layers(model)):
            self._handles.append(layer.attention.output.dense.register_forward_pre_hook(self._head_hook(index)))
            self._handles.append(layer.intermediate.register_forward_hook(self._ffn_hook(index)))
        return self

    def remove(self) -> None:
        """Remove the hooks; the model computes as if unmasked again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _head_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            context, *rest = args  # [B, T, A*d], heads in order along the last axis
            heads = context.reshape(*context.shape[:-1], self.head_mask.size(1), -1)
            if self._group_masks is None:
                heads = heads * self.head_mask[index].to(context.dtype)[:, None]
            else:  # [B, A]: each example's group's copy
                heads = heads * self._group_masks[0][self.example_groups, index].to(context.dtype)[:, None, :, None]
            return (heads.reshape(context.shape), *rest)
        return hook

    def _ffn_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:  # [B, T, F]
            if self._group_masks is None:
                return output * self.ffn_mask[index].to(output.dtype)
            return output * self._group_masks[1][self.example_groups, index].to(output.dtype)[:, None]
        return hook

    @contextmanager
    def per_group(self, n_groups: int):
        """Within the block, the hooks use one copy of the masks per group of examples, which example is in which
        group set before each forward in `example_groups` [B]; yields the copies (head [G, L, A], FFN [G, L, F],
        leaves that collect gradients). One backward through a forward over examples of several groups gives each
        group its own gradient: CAP-f's importance is Σ over batches of |∂L_batch/∂m|, so the examples of several
        batches can share forwards (grouped by length, less padding) and still give each batch its own |∂L/∂m|."""
        copies = tuple(mask.detach().expand(n_groups, *mask.shape).clone().requires_grad_(True)
                       for mask in (self.head_mask, self.ffn_mask))
        self._group_masks = copies
        try:
            yield copies
        finally:
            self._group_masks = self.example_groups = None

    def track_gradients(self, enabled: bool = True) -> None:
        """Let backward fill `head_mask.grad` / `ffn_mask.grad` (importance); disabling also clears them."""
        for mask in (self.head_mask, self.ffn_mask):
            mask.requires_grad_(enabled)
            if not enabled:
                mask.grad = None

    def state_dict(self) -> dict[str, Tensor]:
        return {"head_mask": self.head_mask.detach().cpu().clone(), "ffn_mask": self.ffn_mask.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy saved masks in place (registered hooks see the new values)."""
        for name in ("head_mask", "ffn_mask"):
            mask = getattr(self, name)
            if tuple(state[name].shape) != tuple(mask.shape):
                raise ValueError(f"saved {name} has shape {tuple(state[name].shape)}, expected {tuple(mask.shape)}")
            with torch.no_grad():
                mask.copy_(state[name])

    def fold(self, model: nn.Module) -> dict[str, Tensor]:
        """Zero in `model`'s weights what the masks remove, so that the stock model, without hooks, computes what the
        masked one does: the value rows and bias of each masked head (its values are 0, so its context is 0 whatever
        the attention probabilities) and the FFN-input row and bias of each masked neuron (act(0) = 0). Query/key
        rows and the output projections are left alone: they no longer change the output.

        Returns what was zeroed, {parameter name: rows [R, ...]} (R = masked heads · head size, or masked neurons,
        in row order), on the CPU, for `unfold`."""
        zeroed = {}
        with torch.no_grad():
            for name, param, rows in self._folded_rows(model):
                rows = rows.to(param.device)
                zeroed[name] = param[rows].cpu()
                param[rows] = 0
        return zeroed

    def unfold(self, model: nn.Module, zeroed: dict[str, Tensor]) -> None:
        """Put back the rows `fold` returned (with these same masks): the weights as they were before folding."""
        with torch.no_grad():
            for name, param, rows in self._folded_rows(model):
                param[rows.to(param.device)] = zeroed[name].to(param.device, param.dtype)

    def _folded_rows(self, model: nn.Module) -> list[tuple[str, nn.Parameter, Tensor]]:
        """(parameter name, parameter, masked rows [R]) of every value projection and FFN input, weights and biases."""
        names = {id(p): name for name, p in model.named_parameters()}
        targets = []
        for index, layer in enumerate(encoder_layers(model)):
            activation = layer.intermediate.intermediate_act_fn
            if activation(torch.zeros(1)).item() != 0:
                raise ValueError(f"layer {index}'s FFN activation {activation} is not 0 at 0: zeroed FFN-input rows "
                                 "would not remove its masked neurons")
            value = layer.attention.self.value
            head_size = value.out_features // self.head_mask.size(1)
            heads = (self.head_mask[index] == 0).nonzero().flatten().cpu()
            head_rows = (heads[:, None] * head_size + torch.arange(head_size)).flatten()
            neuron_rows = (self.ffn_mask[index] == 0).nonzero().flatten().cpu()
            for linear, rows in ((value, head_rows), (layer.intermediate.dense, neuron_rows)):
                targets += [(names[id(p)], p, rows) for p in (linear.weight, linear.bias) if p is not None]
        return targets

    def sparsity(self) -> dict[str, float]:
        """Fractions removed (spec Q13): `heads`, `ffn_neurons` (units masked) and `encoder_params`.

        `encoder_params` counts per masked head its Q/K/V weight rows and biases and its output-projection columns,
        per masked neuron its FFN-in row and bias and its FFN-out column, over all parameters of the encoder
        (LayerNorms and the kept output biases included in the total).
        """
        if self._unit_sizes is None:
            raise RuntimeError("parameter counts unknown: build the masks with from_model() or apply() them")
        per_head, per_neuron, total = self._unit_sizes
        heads_off = (self.head_mask.detach() == 0).sum(dim=1).cpu()
        neurons_off = (self.ffn_mask.detach() == 0).sum(dim=1).cpu()
        removed = (heads_off * per_head).sum() + (neurons_off * per_neuron).sum()
        return {"heads": heads_off.sum().item() / self.head_mask.numel(),
                "ffn_neurons": neurons_off.sum().item() / self.ffn_mask.numel(),
                "encoder_params": removed.item() / total}


def _unit_sizes(model: nn.Module) -> tuple[Tensor, Tensor, int]:
    """Parameters per head [L] and per FFN neuron [L], and the encoder's parameter count."""
    _, n_heads, n_neurons = mask_shapes(model)
    per_head, per_neuron = [], []
    for layer in encoder_layers(model):
        attention = layer.attention
        qkv = sum(_size(getattr(attention.self, name)) for name in ("query", "key", "value"))
        per_head.append((qkv + _size(attention.output.dense, with_bias=False)) // n_heads)
        per_neuron.append((_size(layer.intermediate.dense) + _size(layer.output.dense, with_bias=False)) // n_neurons)
    total = sum(p.numel() for p in model.base_model.encoder.parameters())
    return torch.tensor(per_head), torch.tensor(per_neuron), total


def pruning_targets(n_heads_total: int, n_neurons_total: int, sequence: Sequence[float]) -> list[tuple[int, int]]:
    """Cumulative (heads, neurons) to have masked after each step: `int(total · p)` for p in `sequence`.

    The totals come from the model's real shapes (spec Q11). The 1e-9 guards against float round-off so that
    p=0.29 of 100 gives 29, as the original's integer percentages do.
    """
    values = [float(p) for p in sequence]
    if not values:
        raise ValueError("the pruning sequence is empty; give increasing fractions such as [0.1, 0.2, ..., 0.9]")
    if any(not 0 < p < 1 for p in values):
        raise ValueError(f"pruning sequence {values}: every fraction must lie strictly between 0 and 1")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"pruning sequence {values} must be strictly increasing (cumulative fractions)")
    return [(int(n_heads_total * p + 1e-9), int(n_neurons_total * p + 1e-9)) for p in values]


@dataclass(frozen=True)
class Packing:
    """How `compute_importance` may run its forwards: the examples of consecutive batches (up to `tokens` padded
    tokens) sorted by length and run `rows` at a time, so little of each forward is padding. `forward(model,
    inputs)` returns per-example outputs {name: [B, ...]} (a classification head's logits, a sentence vector); the
    loss function then gets them, with its batch, as `loss_fn(model, batch, outputs)`. Sound where an example's
    outputs do not depend on the others in its forward (eval mode, per-example outputs, right padding)."""
    forward: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]]
    rows: int = 64
    tokens: int = 8192


def compute_importance(model: nn.Module, masks: StructuredMasks, batches: Iterable[dict[str, Tensor]],
                       loss_fn: Callable[..., Tensor], desc: str | None = None,
                       packing: Packing | None = None) -> tuple[Tensor, Tensor]:
    """First-order importance I = Σ_batches |∂L/∂m| (spec §5.1), evaluated at the current masks.

    Runs in eval mode. Parameters are frozen for the pass (no weight gradients are computed, the cheap way to
    discard them after each batch) and every flag is restored afterwards. `loss_fn(model, batch)` returns the
    scalar loss the caller chooses (CAP-f: the full training loss). `desc` shows a tqdm bar.
    With `packing`, several batches share forwards grouped by length and one backward, each batch with its own copy
    of the masks (`StructuredMasks.per_group`), so each still adds its own |∂L/∂m|: the same sum, less padding.
    Under torch.distributed give each rank its own share of the batches: the sums are all-reduced, so every rank
    returns the importance of all batches and selects the same units.
    Returns (head importance [L, A], FFN importance [L, F]), float32 on the masks' device.
    """
    was_training, was_applied, was_tracking = model.training, masks.is_applied, masks.head_mask.requires_grad
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not was_applied:
        masks.apply(model)
    head_importance = torch.zeros_like(masks.head_mask.detach())
    ffn_importance = torch.zeros_like(masks.ffn_mask.detach())
    model.eval()
    model.zero_grad(set_to_none=True)
    masks.track_gradients(True)

    def add(loss: Tensor, head_grads: Tensor, ffn_grads: Tensor) -> None:
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a loss that does not depend on the masks; are they applied to "
                             "this model?")
        loss.backward()
        for importance, grads in ((head_importance, head_grads), (ffn_importance, ffn_grads)):
            if grads.grad is not None:
                importance += grads.grad.abs().reshape(-1, *importance.shape).sum(0)
                grads.grad = None

    try:
        for p in trainable:
            p.requires_grad_(False)
        bar = tqdm(desc=desc, disable=desc is None, unit="batch")
        for chunk in _chunks(batches, packing.tokens if packing else 0):
            if packing is None:
                add(loss_fn(model, chunk[0]), masks.head_mask, masks.ffn_mask)
            else:
                with masks.per_group(len(chunk)) as (head_copies, ffn_copies):
                    add(_packed_loss(model, masks, chunk, packing, loss_fn), head_copies, ffn_copies)
            bar.update(len(chunk))
        bar.close()
    finally:
        for p in trainable:
            p.requires_grad_(True)
        masks.track_gradients(was_tracking)
        if not was_applied:
            masks.remove()
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        for importance in (head_importance, ffn_importance):
            dist.all_reduce(importance)
    return head_importance.float(), ffn_importance.float()


def _chunks(batches: Iterable[dict[str, Tensor]], tokens: int):
    """Consecutive batches, as many as fit in `tokens` padded tokens (at least one; one each for tokens=0)."""
    chunk, used = [], 0
    for batch in batches:
        size = batch["attention_mask"].numel()
        if chunk and used + size > tokens:
            yield chunk
            chunk, used = [], 0
        chunk.append(batch)
        used += size
    if chunk:
        yield chunk


def _packed_loss(model: nn.Module, masks: StructuredMasks, chunk: list[dict[str, Tensor]], packing: Packing,
                 loss_fn: Callable[..., Tensor]) -> Tensor:
    """Σ over the batches of `chunk` of their losses, their examples' outputs computed in forwards of `packing.rows`
    examples of similar length, each example masked by its batch's copy of the masks."""
    lengths = torch.cat([batch["attention_mask"].sum(1) for batch in chunk])
    width = max(batch["attention_mask"].size(1) for batch in chunk)
    tokens = {}  # [N, width]: the per-token inputs of every example, padded on the right to the widest batch
    for key, value in chunk[0].items():
        if value.dim() == 2 and value.shape == chunk[0]["attention_mask"].shape:
            tokens[key] = torch.cat([nn.functional.pad(batch[key], (0, width - batch[key].size(1)))
                                     for batch in chunk])
    positions = torch.arange(width, device=lengths.device)
    if not torch.equal(tokens["attention_mask"].bool(), positions < lengths[:, None]):
        raise ValueError("packed importance needs right-padded batches (attention_mask 1...1 0...0)")
    groups = torch.cat([torch.full((len(batch["attention_mask"]),), i, device=lengths.device)
                        for i, batch in enumerate(chunk)])
    order = torch.argsort(lengths, stable=True)
    outputs = []
    for rows in order.split(packing.rows):
        n = int(lengths[rows].max())
        masks.example_groups = groups[rows]
        outputs.append(packing.forward(model, {key: value[rows, :n] for key, value in tokens.items()}))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    merged = {key: torch.cat([out[key] for out in outputs])[inverse] for key in outputs[0]}
    loss, start = 0, 0
    for batch in chunk:
        n = len(batch["attention_mask"])
        loss = loss + loss_fn(model, batch, {key: value[start:start + n] for key, value in merged.items()})
        start += n
    return loss


def normalize_by_layer(importance: Tensor) -> Tensor:
    """Each layer's row [L, X] divided by its L2 norm + 1e-20 (`--normalize_pruning_by_layer`)."""
    return importance / (importance.norm(dim=-1, keepdim=True) + 1e-20)


def _select(importance: Tensor, mask: Tensor, n_to_prune: int, floor: int, floor_among_all: bool,
            unit: str) -> Tensor:
    """Mask the `n_to_prune` lowest-importance unpruned units of [L, X], keeping the `floor` best of each layer."""
    if importance.shape != mask.shape:
        raise ValueError(f"importance {tuple(importance.shape)} and {unit} mask {tuple(mask.shape)} differ in shape")
    if n_to_prune < 0 or not 0 <= floor <= mask.size(1):
        raise ValueError(f"need n_to_prune >= 0 and 0 <= per-layer floor <= {mask.size(1)}, got {n_to_prune}, {floor}")
    importance = importance.detach().to(mask.device, torch.float32)
    if torch.isnan(importance).any():
        raise ValueError(f"{unit} importance contains NaN; check the loss of the importance pass")
    alive = mask.detach() != 0
    ranked = importance if floor_among_all else importance.masked_fill(~alive, float("-inf"))
    protected = torch.zeros_like(alive)
    protected.scatter_(1, ranked.topk(floor, dim=1).indices, True)
    candidates = (alive & ~protected).flatten().nonzero().squeeze(1)
    if n_to_prune > candidates.numel():
        raise ValueError(f"cannot prune {n_to_prune} more {unit}: only {candidates.numel()} can go while keeping "
                         f"{floor} per layer ({int(alive.sum())} of {mask.numel()} still unpruned)")
    order = importance.flatten()[candidates].argsort(stable=True)
    new_mask = mask.detach().clone()
    new_mask.view(-1)[candidates[order[:n_to_prune]]] = 0
    return new_mask


def select_heads(importance: Tensor, head_mask: Tensor, n_to_prune: int, *, min_heads_per_layer: int = 1,
                 legacy_floor: bool = False) -> Tensor:
    """New head_mask [L, A] with `n_to_prune` more heads masked: global ascending ranking, masked heads skipped.

    The floor protects the `min_heads_per_layer` best *unpruned* heads of each layer (spec Q10), so a layer never
    loses all its heads. `legacy_floor=True` is the original's rule: the best heads among all heads, masked ones
    included, which can empty a layer.
    """
    new_mask = _select(importance, head_mask, n_to_prune, min_heads_per_layer, legacy_floor, "heads")
    emptied = ((new_mask == 0).all(dim=1) & (head_mask != 0).any(dim=1)).nonzero().flatten().tolist()
    if emptied:
        logger.warning("layers %s lost their last head (legacy_floor=%s, min_heads_per_layer=%d; spec Q10)",
                       emptied, legacy_floor, min_heads_per_layer)
    return new_mask


def select_neurons(importance: Tensor, ffn_mask: Tensor, n_to_prune: int, *, min_per_layer: int = 0) -> Tensor:
    """New ffn_mask [L, F] with `n_to_prune` more neurons masked: one global ascending ranking, masked ones skipped.

    No floor by default, as the original (spec Q12); `min_per_layer` keeps that many best unpruned neurons per layer.
    """
    return _select(importance, ffn_mask, n_to_prune, min_per_layer, False, "FFN neurons")
