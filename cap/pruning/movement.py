"""Movement pruning (spec §5.2-5.4): learnable scores S on the encoder matrices, W_eff = M(S) ⊙ W with
straight-through gradients to S, Top-K (CAP-m) or threshold (CAP-soft) masks, the cubic level schedule, the L1
regulariser, and a λ controller that lands CAP-soft on a target sparsity (beyond the original).

Scores are attached with torch.nn.utils.parametrize: the Hugging Face classes stay unmodified. One score per weight
(`element`, the paper's) or per head and FFN neuron (`structured`: cap/pruning/granularity.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cap.pruning.granularity import GRANULARITIES, structured_parametrizations, weighted_quantile
from cap.pruning.structured import encoder_layers

PRUNED_MODULES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense")
SOFT_FLOOR = 0.005  # CAP-soft keeps at least 0.5 % of every matrix (spec Q17)


class _StraightThrough(torch.autograd.Function):
    """A binarizer's backward: the mask's gradient passes to the scores unchanged (straight-through estimator)."""

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _TopK(_StraightThrough):
    """1 for the k largest scores; straight-through backward."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int) -> Tensor:
        mask = torch.zeros_like(scores)
        if k > 0:
            mask.view(-1)[torch.topk(scores.flatten(), k, sorted=False).indices] = 1
        return mask


class _Threshold(_StraightThrough):
    """1 where sigmoid(S) > τ; at least int(0.005·numel)+1 entries (the largest scores); straight-through."""

    @staticmethod
    def forward(ctx, scores: Tensor, threshold: float) -> Tensor:
        mask = (torch.sigmoid(scores) > threshold).to(scores.dtype)
        floor = int(SOFT_FLOOR * scores.numel()) + 1
        if mask.sum() < floor:
            mask.zero_().view(-1)[torch.topk(scores.flatten(), floor, sorted=False).indices] = 1
        return mask


def topk_mask(scores: Tensor, keep_fraction: float) -> Tensor:
    """1 for the int(keep_fraction·numel) largest scores of the matrix (spec §5.2)."""
    return _TopK.apply(scores, int(keep_fraction * scores.numel()))


def threshold_mask(scores: Tensor, threshold: float) -> Tensor:
    return _Threshold.apply(scores, threshold)


CRITERIA = ("topk", "soft", "magnitude")  # prune.criterion


def criterion_mask(criterion: str, scores: Tensor, weight: Tensor, level: float) -> Tensor:
    """The mask of one matrix: Top-K of the scores (CAP-m) or of |W| (magnitude pruning, the baseline of the
    paper's tables: the same schedule, no scores learned), or the soft threshold on the scores (CAP-soft)."""
    if criterion == "topk":
        return topk_mask(scores, level)
    if criterion == "magnitude":
        return topk_mask(weight.detach().abs(), level)
    return threshold_mask(scores, level)


class MaskedWeight(nn.Module):
    """The parametrization W -> M(S) ⊙ W of one matrix; S [out, in] is this module's parameter (unused, and never
    updated, by the magnitude criterion)."""

    owns_scores, entries_per_score = True, 1  # as granularity.UnitMaskedWeight, whose scores may be another's

    def __init__(self, shape, state: "MovementScores", init: float):
        super().__init__()
        self.scores = nn.Parameter(torch.full(shape, float(init)))
        self._state = [state]  # a list: not registered as a submodule

    def unit_scores(self) -> Tensor:
        return self.scores

    def mask(self, weight: Tensor) -> Tensor:
        state = self._state[0]
        return criterion_mask(state.criterion, self.scores, weight, state.level).to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask(weight)


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The six matrices of every encoder layer that movement pruning masks (spec §5.2)."""
    found = []
    for i, layer in enumerate(encoder_layers(model)):
        for name in PRUNED_MODULES:
            module = layer.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise TypeError(f"layer {i} has no Linear at {name}: movement pruning needs BERT-style layers")
            found.append((f"layer.{i}.{name}", module))
    return found


class MovementScores:
    """Scores on all prunable matrices of `model` and the current level (keep fraction ρ or threshold τ)."""

    def __init__(self, model: nn.Module, criterion: str, init: float = 0.0, granularity: str = "element"):
        if criterion not in CRITERIA or granularity not in GRANULARITIES or (criterion, granularity) == (
                "magnitude", "structured"):
            raise ValueError(f"criterion={criterion!r}, granularity={granularity!r}: use one of {', '.join(CRITERIA)} "
                             f"and one of {', '.join(GRANULARITIES)} (magnitude: element only)")
        self.model, self.criterion, self.granularity = model, criterion, granularity
        self.level = 0.0 if criterion == "soft" else 1.0
        self.linears = prunable_linears(model)
        if granularity == "element":
            masks = [MaskedWeight(linear.weight.shape, self, init) for _, linear in self.linears]
        else:
            binarizers = (_TopK.apply, threshold_mask)  # Top-K of a count of units, and the soft threshold
            masks = [m for layer in encoder_layers(model) for m in structured_parametrizations(layer, self, init,
                                                                                                binarizers)]
        for (_, linear), mask in zip(self.linears, masks):
            parametrize.register_parametrization(linear, "weight", mask)

    @classmethod
    def attach(cls, model: nn.Module, criterion: str, *, init: float = 0.0,
               granularity: str = "element") -> "MovementScores":
        return cls(model, criterion, init, granularity)

    def set_level(self, value: float) -> None:
        self.level = float(value)

    def _weights(self):
        return [(name, linear.parametrizations.weight) for name, linear in self.linears]

    def score_parameters(self) -> list[nn.Parameter]:
        return [p[0].scores for _, p in self._weights() if p[0].owns_scores]

    def param_groups(self, *, lr: float, weight_decay: float, score_lr: float) -> list[dict]:
        """Optimizer groups: the model's trainable weights with weight decay, its biases and LayerNorm weights
        without (as the original and the Hugging Face Trainer), then the scores (own lr, no weight decay; spec
        §5.2), always last."""
        own = {id(s) for s in self.score_parameters()}
        no_decay = {id(p) for m in self.model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        no_decay |= {id(p) for name, p in self.model.named_parameters() if name.endswith("bias")}
        weights = [w for w in self.model.parameters() if id(w) not in own and w.requires_grad]
        return [{"params": [w for w in weights if id(w) not in no_decay], "lr": lr, "weight_decay": weight_decay},
                {"params": [w for w in weights if id(w) in no_decay], "lr": lr, "weight_decay": 0.0},
                {"params": self.score_parameters(), "lr": score_lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def masks(self) -> dict[str, Tensor]:
        return {name: p[0].mask(p.original).bool() for name, p in self._weights()}

    @torch.no_grad()
    def unit_masks(self) -> dict[str, Tensor]:
        """Structured granularity: `head_mask` [L, A] and `ffn_mask` [L, F] (1 keep), as `cap.export` takes them."""
        owners = [p[0] for _, p in self._weights() if p[0].owns_scores]  # per layer: the query's, the FFN input's
        return {"head_mask": torch.stack([m.unit_mask() for m in owners[0::2]]).float().cpu(),
                "ffn_mask": torch.stack([m.unit_mask() for m in owners[1::2]]).float().cpu()}

    def quantile_inputs(self) -> tuple[list[Tensor], list[int] | None]:
        """What `SparsityController.update` reads: every score tensor, and (structured) the entries one score masks
        in each of the matrices it serves; None: one entry each."""
        if self.granularity == "element":
            return self.score_parameters(), None
        return [p[0].unit_scores() for _, p in self._weights()], [p[0].entries_per_score for _, p in self._weights()]

    def regularization(self) -> Tensor:
        """R_L1 = mean over matrices of Σ sigmoid(S) / numel (spec §5.3); structured: of the unit scores'."""
        scores = [p[0].unit_scores() for _, p in self._weights()]
        return sum(torch.sigmoid(s).mean() for s in scores) / len(scores)

    def sparsity(self) -> dict[str, float]:
        """`entries`: fraction of the prunable matrices' entries masked; `encoder_params`: fraction of all encoder
        parameters (biases and LayerNorms count as kept) that are masked (spec Q13)."""
        masked = sum(int((~m).sum()) for m in self.masks().values())
        entries = sum(p.original.numel() for _, p in self._weights())
        encoder = sum(p.numel() for n, p in self.model.base_model.encoder.named_parameters() if "scores" not in n)
        return {"entries": masked / entries, "encoder_params": masked / encoder}

    def fold(self) -> None:
        """Replace every parametrization by the plain weight M ⊙ W at the current level: a stock model with zeros."""
        for _, linear in self.linears:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)

    def state_dict(self) -> dict:
        return {"level": self.level, "scores": [s.detach().clone() for s in self.score_parameters()]}

    def load_state_dict(self, state: dict) -> None:
        self.level = state["level"]
        with torch.no_grad():
            for mine, saved in zip(self.score_parameters(), state["scores"]):
                mine.copy_(saved)


def threshold_schedule(step: int, *, total_steps: int, warmup_steps: int, initial: float, final: float,
                       initial_warmup: float, final_warmup: float) -> float:
    """The cubic level schedule of spec §5.4; `step` = optimizer updates done before this batch."""
    W, T = warmup_steps, total_steps
    if step <= initial_warmup * W:
        return initial
    if step > T - final_warmup * W:
        return final
    progress = (step - initial_warmup * W) / (T - (initial_warmup + final_warmup) * W)
    return final + (initial - final) * (1 - progress) ** 3


def schedule_phases(*, total_steps: int, warmup_steps: int, initial_warmup: float,
                    final_warmup: float) -> tuple[int, int, int]:
    """(initial, ramp, final): how many of the steps 0..T-1 `threshold_schedule` keeps at the initial level, moves
    along the cubic ramp (the last ramp step may reach the final level) and holds at the final level."""
    W, T = warmup_steps, total_steps
    initial = min(T, math.floor(initial_warmup * W) + 1)  # steps s <= initial_warmup·W
    final = T - min(T, max(math.floor(T - final_warmup * W) + 1, initial))  # steps s > T - final_warmup·W
    return initial, T - initial - final, final


def lambda_schedule(threshold: float, *, final_lambda: float, final: float) -> float:
    """λ_t = final_lambda · τ_t / τ_final (spec §5.3): 0 while τ is 0, final_lambda at the end."""
    return final_lambda * threshold / final if final else 0.0


@dataclass(frozen=True)
class PruneSchedule:
    """A movement run's schedule, read once from `prune.*` and the run's T and W (`from_config`): the level before
    each update (Top-K keep fraction or threshold τ) and, without a controller, CAP-soft's λ at that level."""

    criterion: str           # topk (CAP-m), soft (CAP-soft), magnitude
    initial: float
    final: float
    initial_warmup: float    # in W
    final_warmup: float      # in W
    final_lambda: float
    total_steps: int         # T
    warmup_steps: int        # W

    @classmethod
    def from_config(cls, prune, total_steps: int, warmup_steps: int) -> PruneSchedule:
        return cls(criterion=prune.criterion, initial=prune.initial, final=prune.final,
                   initial_warmup=prune.initial_warmup, final_warmup=prune.final_warmup,
                   final_lambda=prune.final_lambda, total_steps=total_steps, warmup_steps=warmup_steps)

    def level(self, step: int) -> float:
        return threshold_schedule(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                                  initial=self.initial, final=self.final, initial_warmup=self.initial_warmup,
                                  final_warmup=self.final_warmup)

    def lam(self, level: float) -> float:
        return lambda_schedule(level, final_lambda=self.final_lambda, final=self.final)


class SparsityController:
    """Steers CAP-soft's λ so that the run ends at `target` sparsity (beyond the original, which needs a hand-tuned
    λ per task and sparsity and lands wherever it lands).

    The run ends at the target when the target-quantile q of all scores sits at the cut logit(τ_final) (sigmoid(S) <
    τ_final <=> S < cut). Feeding back the sparsity itself fails: scores start together at 0 and need many updates
    to reach the cut, so λ winds up and the whole block crosses at once (bang-bang). Instead the controller steers
    the velocity of q: it should cover the distance left to the cut in the travel left (the learning rate decays
    linearly to 0, so the travel is half the updates left); log λ integrates the velocity error, measured in units
    of the scores' learning rate. λ is 0 while `active` is false (the original's λ_t = λ·τ_t/τ_final is 0 there).
    q is read on a fixed random sample of `sample` entries, so a step costs O(sample), not O(parameters).

    It needs scores that task gradients tell apart: on a tiny BERT that learns a task it lands within ±0.5 points
    (tests/test_movement.py); where the scores move as one block (a model that learns nothing) the sparsity jumps
    over the target. And the scores must be able to reach the cut: Adam moves a score about `score_lr` per update,
    so a short run needs a larger `prune.score_lr`. `missed` says so when a run ends off target."""

    def __init__(self, target: float, initial_lambda: float, final_threshold: float, total_steps: int,
                 gain: float = 0.3, beta: float = 0.5, sample: int = 1 << 20, seed: int = 0):
        self.target, self.total_steps, self.gain, self.beta = target, total_steps, gain, beta
        self.cut = math.log(final_threshold / (1 - final_threshold))
        self.log_lambda = math.log(max(float(initial_lambda), 1e-3))
        self.sample, self.seed = sample, seed
        self.quantile = self.velocity = None
        self._rows: list[Tensor | None] | None = None
        self.lam = 0.0

    def _quantile(self, scores: list[Tensor]) -> float:
        if self._rows is None:  # the same entries every step: about `sample` of them, spread over the matrices
            g = torch.Generator().manual_seed(self.seed)
            total = sum(s.numel() for s in scores)
            self._rows = [torch.randint(s.numel(), (max(1, s.numel() * self.sample // total),), generator=g)
                          .to(s.device) if total > self.sample else None for s in scores]
        flat = torch.cat([s.detach().flatten() if rows is None else s.detach().flatten()[rows]
                          for s, rows in zip(scores, self._rows)])
        return float(flat.float().kthvalue(max(int(self.target * flat.numel()), 1)).values)

    def update(self, scores: list[Tensor], step: int, lr: float, active: bool = True,
               weights: list[int] | None = None) -> float:
        """`weights`: the matrix entries one score of each tensor masks (structured scores), None: one each."""
        q = self._quantile(scores) if weights is None else weighted_quantile(scores, weights, self.target)
        if self.quantile is not None:
            move = q - self.quantile
            self.velocity = move if self.velocity is None else self.beta * self.velocity + (1 - self.beta) * move
        self.quantile = q
        if not active:
            self.lam = 0.0
            return self.lam
        travel = max((self.total_steps - step) / 2, 1.0)
        wanted = (self.cut - q) / travel
        error = ((self.velocity or 0.0) - wanted) / max(lr, 1e-12)  # > 0: q falls too slowly -> more λ
        self.log_lambda += self.gain * max(min(error, 1.0), -1.0)
        self.lam = math.exp(self.log_lambda)
        return self.lam

    def missed(self, sparsity: float, tolerance: float = 0.005) -> str | None:
        """Why the run did not land within `tolerance` of the target, or None when it did."""
        if abs(sparsity - self.target) <= tolerance:
            return None
        return (f"prune.target_sparsity={self.target}: the run ended at {sparsity:.4f} "
                f"({100 * (sparsity - self.target):+.2f} points). The scores start at 0 and must fall below "
                f"logit(prune.final)={self.cut:.2f} after the dense phase, at a pace that the scores' learning rate "
                f"bounds, and only task gradients tell them apart: raise prune.score_lr or trainer.epochs")

    def state_dict(self) -> dict[str, Tensor]:
        values = [self.log_lambda, self.lam, float("nan") if self.quantile is None else self.quantile,
                  float("nan") if self.velocity is None else self.velocity]
        return {"state": torch.tensor(values, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        log_lambda, lam, quantile, velocity = state["state"].tolist()
        self.log_lambda, self.lam = log_lambda, lam
        self.quantile = None if math.isnan(quantile) else quantile
        self.velocity = None if math.isnan(velocity) else velocity
