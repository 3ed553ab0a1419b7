"""CAPTrainer: the Hugging Face Trainer with CAP's loss. Glue only: the math lives in cap.losses."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer

from cap.losses import kd_loss, span_loss, task_loss

LABEL_KEYS = ("labels", "start_positions", "end_positions")


@dataclass
class LossWeights:
    ce: float = 1.0
    kd: float = 0.0
    kd_temperature: float = 1.0


class CAPTrainer(Trainer):
    """`loss = ce·CE + kd·KD (+ the terms later stages add)`; every term is logged as `loss_<name>`."""

    def __init__(self, *args, weights: LossWeights, teacher: torch.nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = weights
        self.teacher = teacher
        if weights.kd > 0 and teacher is None:
            raise ValueError("kd.weight > 0 needs a teacher: set teacher.path=<fine-tuned checkpoint>")
        if teacher is not None:
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0

    def loss_terms(self, model, inputs) -> tuple[dict[str, torch.Tensor], object]:
        """The unweighted loss terms of one batch, and the student's outputs."""
        inputs = dict(inputs)
        inputs.pop("idx", None)
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
        return terms, outputs

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self.weights, name) * value for name, value in terms.items())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms, outputs = self.loss_terms(model, inputs)
        loss = self.weighted(terms)
        if model.training:
            for name, value in terms.items():
                # summed on device; read back only when logging (no sync per step)
                self._term_sums[name] = self._term_sums.get(name, 0) + value.detach().float()
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._term_count:
            logs.update({f"loss_{k}": round(v.item() / self._term_count, 6) for k, v in self._term_sums.items()})
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, *args, **kwargs)
