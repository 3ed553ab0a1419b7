"""CAPTrainer: the Hugging Face Trainer with CAP's loss (spec §3). Glue only: the math lives in cap.losses and
cap.contrastive, the banks in cap.banks, the pruning in cap.pruning."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Trainer

from cap.contrastive import RepresentationBank, contrastive_loss, draw_extra_idx
from cap.losses import gradient_balance, kd_loss, span_loss, task_loss
from cap.models import RepresentationTap

LABEL_KEYS = ("labels", "start_positions", "end_positions")
TASK_TERMS = ("ce", "kd")


@dataclass
class LossWeights:
    ce: float = 1.0
    kd: float = 0.0
    kd_temperature: float = 1.0


@dataclass
class Contrast:
    """The contrastive terms' settings (config group `contrast`); the weights act inside `contrastive_loss`."""
    temperature: float = 0.1
    unsup_weight: float = 0.3
    sup_weight: float = 3.0
    extra_examples: int = 4096
    normalization: str = "original"
    pooling: str = "cls"


class CAPTrainer(Trainer):
    """`loss = ce·CE + kd·KD + Σ_{bank in PrC, FiC, SnC} contrastive(bank) (+ reg)`; each term logged as `loss_<name>`.

    `banks` maps a name (prc, fic, snc) to a RepresentationBank; the ones holding no snapshot yet are skipped.
    Contrastive terms are computed in training only (evaluation batches carry no contrastive term). At every logging
    step the gradients of the task part (ce·CE + kd·KD) and of the contrastive part w.r.t. the encoder are compared
    (`grad_norm_task`, `grad_norm_contrast`, `grad_cosine`: `cap.losses.gradient_balance`), on a single process."""

    def __init__(self, *args, weights: LossWeights, teacher: torch.nn.Module | None = None,
                 banks: dict[str, RepresentationBank] | None = None, contrast: Contrast | None = None,
                 draw_seed: int = 0, regularizer: Callable[[], torch.Tensor] | None = None,
                 log_extras: Callable[[], dict[str, float]] | None = None,
                 fixed_extra_idx: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = weights
        self.teacher = teacher
        if weights.kd > 0 and teacher is None:
            raise ValueError("kd.weight > 0 needs a teacher: set teacher.path=<fine-tuned checkpoint>")
        if teacher is not None:
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.regularizer = regularizer  # returns the weighted term, e.g. CAP-soft's λ_t · R_L1
        self.log_extras = log_extras  # values logged with every training loss, e.g. the pruning level and λ
        self.banks = banks or {}
        self.contrast = contrast or Contrast()
        self.tap = RepresentationTap(self.model, self.contrast.pooling) if self.banks else None
        # extras are drawn from a generator reseeded from (draw_seed, step) at every update, so a resumed run draws
        # what an uninterrupted one would; recipes give each rank its own draw_seed (spec Q4)
        self.draw_seed = draw_seed
        # bank name -> extra ids used at every step instead of draws: tests, comparisons with another implementation
        self.fixed_extra_idx = fixed_extra_idx
        self.generator = torch.Generator().manual_seed(draw_seed)
        self._seeded_step = -1
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._balance: dict[str, float] = {}

    def loss_terms(self, model, inputs, contrast: bool | None = None) -> tuple[dict[str, torch.Tensor], object]:
        """The loss terms of one batch (CE and KD unweighted, contrastive terms with their weights), and outputs.

        Contrastive terms are computed in training (`contrast=None`), or when asked: CAP-f's importance pass runs
        the full loss in eval mode (spec §5.1)."""
        inputs = dict(inputs)
        idx = inputs.pop("idx", None)
        targets = {k: inputs.pop(k) for k in LABEL_KEYS if k in inputs}
        outputs = model(**inputs)
        terms = {}
        if "labels" in targets:
            terms["ce"] = task_loss(outputs.logits, targets["labels"])
        elif "start_positions" in targets:
            terms["ce"] = span_loss(outputs.start_logits, outputs.end_logits,
                                    targets["start_positions"], targets["end_positions"])
        if self.weights.kd > 0:
            with torch.no_grad():
                teacher_out = self.teacher(**inputs)
            t = self.weights.kd_temperature
            if hasattr(outputs, "start_logits"):
                terms["kd"] = (kd_loss(outputs.start_logits, teacher_out.start_logits, t)
                               + kd_loss(outputs.end_logits, teacher_out.end_logits, t)) / 2
            else:
                terms["kd"] = kd_loss(outputs.logits, teacher_out.logits, t)
        if (model.training if contrast is None else contrast) and idx is not None and self.banks:
            terms.update(self.contrastive_terms(idx, inputs["attention_mask"], targets.get("labels")))
        if model.training and self.regularizer is not None:
            terms["reg"] = self.regularizer()
        return terms, outputs

    def release(self) -> None:
        """Detach the representation hooks from the model (a recipe builds one trainer per pruning step)."""
        if self.tap is not None:
            self.tap.remove()
            self.tap = None

    def contrastive_terms(self, idx, attention_mask, labels) -> dict[str, torch.Tensor]:
        rep = self.tap.representation(attention_mask)
        c = self.contrast
        if self.model.training and self.state.global_step != self._seeded_step:
            self._seeded_step = self.state.global_step
            self.generator.manual_seed(self.draw_seed * 1_000_003 + self._seeded_step)
        # the supervised term needs class ids: none for QA and regression (spec §6)
        use_labels = labels is not None and not labels.is_floating_point()
        terms = {}
        for name, bank in self.banks.items():  # order prc, fic, snc fixes the draws (spec §2.7)
            if bank.n_reps == 0:
                continue
            if self.fixed_extra_idx is not None:
                extra = self.fixed_extra_idx[name]
            else:
                extra = draw_extra_idx(bank.n_items, bank.n_reps, c.extra_examples, self.generator)
            terms[name] = contrastive_loss(
                rep, bank.view(), idx, extra, temperature=c.temperature, unsup_weight=c.unsup_weight,
                sup_weight=c.sup_weight if use_labels else 0.0, labels=labels if use_labels else None,
                bank_labels=bank.labels if use_labels else None, normalization=c.normalization,
            )
        return terms

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        # CE and KD carry their config weights; contrastive and regulariser terms come weighted
        return sum(getattr(self.weights, name, 1.0) * value for name, value in terms.items())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms, outputs = self.loss_terms(model, inputs)
        loss = self.weighted(terms)
        if model.training and self._logs_after_this_update() and set(terms) & set(self.banks):
            task = self.weighted({k: terms[k] for k in TASK_TERMS if k in terms})
            contrast = self.weighted({k: terms[k] for k in self.banks if k in terms})
            if torch.is_tensor(task) and self.args.world_size == 1:  # autograd.grad would bypass DDP's reducer
                self._balance = gradient_balance(task, contrast, [
                    p for p in self.model.base_model.encoder.parameters() if p.requires_grad])
        if model.training:
            for name, value in terms.items():
                # summed on device; read back only when logging (no sync per step)
                self._term_sums[name] = self._term_sums.get(name, 0) + value.detach().float()
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def _logs_after_this_update(self) -> bool:
        steps = self.args.logging_steps
        return steps >= 1 and (self.state.global_step + 1) % int(steps) == 0

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._term_count:
            logs.update({f"loss_{k}": round(v.item() / self._term_count, 6) for k, v in self._term_sums.items()})
            self._term_sums.clear()
            self._term_count = 0
        if "loss" in logs and self._balance:
            logs.update({k: round(v, 6) for k, v in self._balance.items()})
            self._balance = {}
        if "loss" in logs and self.log_extras is not None:
            logs.update(self.log_extras())
        super().log(logs, *args, **kwargs)
