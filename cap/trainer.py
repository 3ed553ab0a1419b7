"""CAPTrainer: the Hugging Face Trainer with CAP's loss (spec §3). Glue only: the math lives in cap.losses and
cap.contrastive, the banks in cap.banks, the pruning in cap.pruning."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from cap.contrastive import RepresentationBank, contrastive_loss, draw_extra_idx
from cap.losses import gradient_balance, kd_loss, span_loss, task_loss, withheld_gradient
from cap.models import RepresentationTap
from cap.precision import autocast, full_precision
from cap.teacher import TeacherOutputs

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
    reaches: str = "both"  # or "weights" / "scores": the contrastive gradient withheld from the other part


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """The Trainer's length-grouped sampler, its draws seeded by (seed, epoch): the Trainer calls `set_epoch` before
    every epoch, so every rank draws the same order (however much dropout each consumed), and a run resumed
    mid-epoch draws that epoch's order again and skips the batches it had trained on."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)


class CAPTrainer(Trainer):
    """`loss = ce·CE + kd·KD + Σ_{bank in PrC, FiC, SnC} contrastive(bank) (+ reg)`; each term logged as `loss_<name>`.

    `banks` maps a name (prc, fic, snc) to a RepresentationBank; the ones holding no snapshot yet are skipped.
    Contrastive terms are computed in training only (evaluation batches carry no contrastive term). At every logging
    step the gradients of the task part (ce·CE + kd·KD) and of the contrastive part w.r.t. the encoder are compared
    (`grad_norm_task`, `grad_norm_contrast`, `grad_cosine`: `cap.losses.gradient_balance`), on a single process;
    for a movement method also for the scores and the weights apart (`grad_norm_task_scores`, ...,
    `grad_cosine_weights`). `contrast.reaches` keeps the contrastive gradient from the scores or from the weights.

    With `teacher_outputs` (cap.teacher) the teacher's logits are looked up by example id instead of recomputed.
    The student's and teacher's forwards run under the precision's autocast; the losses stay fp32 (spec Q21).
    Evaluation computes CE only: the teacher is not run to score the dev set."""

    loss_is_scaled_for_ga = False  # compute_loss returns a micro-batch's mean: the Trainer divides by accumulation

    def __init__(self, *args, weights: LossWeights, teacher: torch.nn.Module | None = None,
                 banks: dict[str, RepresentationBank] | None = None, contrast: Contrast | None = None,
                 draw_seed: int = 0, regularizer: Callable[[], torch.Tensor] | None = None,
                 log_extras: Callable[[], dict[str, float]] | None = None,
                 fixed_extra_idx: dict[str, torch.Tensor] | None = None,
                 teacher_outputs: TeacherOutputs | None = None, update_offset: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.update_offset = update_offset  # updates before this Trainer's (earlier CAP-f stages): logged as `update`
        self.weights = weights
        self.teacher = teacher
        self.teacher_outputs = teacher_outputs
        self.precision = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32"
        if weights.kd > 0 and teacher is None:
            raise ValueError("kd.weight > 0 needs a teacher: set teacher.path=<fine-tuned checkpoint>")
        if teacher is not None:
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.regularizer = regularizer  # returns the weighted term, e.g. CAP-soft's λ_t · R_L1
        self.log_extras = log_extras  # values logged with every training loss, e.g. the pruning level and λ
        self.banks = banks or {}
        self.contrast = contrast or Contrast()
        self.tap = RepresentationTap(self.model, self.contrast.pooling) if self.banks else None
        # extras are drawn from a generator reseeded at every forward of an update from (draw_seed, step, stream),
        # so a resumed run draws what an uninterrupted one would. The stream is the forward's place in the global
        # batch: rank · accumulation steps + micro-batch. Each rank draws its own extras (spec Q4), and one process
        # accumulating the global batch draws, for each micro-batch, what the rank training it would
        self.draw_seed = draw_seed
        self._micro = 0
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
        device = inputs["input_ids"].device
        with autocast(device, self.precision):
            outputs = model(**inputs)
        with full_precision(device):
            return self._terms(model, inputs, idx, targets, outputs, contrast), outputs

    def example_outputs(self, model, inputs) -> dict[str, torch.Tensor]:
        """A classification batch's per-example outputs: logits [B, C] and, with banks, the sentence vector [B, H]
        (`cap.pruning.Packing`'s forward: the importance pass runs examples of several batches together)."""
        device = inputs["input_ids"].device
        with autocast(device, self.precision):
            outputs = {"logits": model(**inputs).logits}
        if self.tap is not None:
            with full_precision(device):
                outputs["rep"] = self.tap.representation(inputs["attention_mask"])
        return outputs

    def batch_loss(self, model, batch, outputs: dict[str, torch.Tensor], contrast: bool) -> torch.Tensor:
        """The weighted loss of `batch` from its examples' `example_outputs`, as `loss_terms` would give it."""
        inputs = dict(batch)
        idx = inputs.pop("idx", None)
        targets = {k: inputs.pop(k) for k in LABEL_KEYS if k in inputs}
        with full_precision(inputs["input_ids"].device):
            logits = SimpleNamespace(logits=outputs["logits"])
            return self.weighted(self._terms(model, inputs, idx, targets, logits, contrast, outputs.get("rep")))

    def _terms(self, model, inputs, idx, targets, outputs, contrast, rep=None) -> dict[str, torch.Tensor]:
        terms = {}
        if "labels" in targets:
            terms["ce"] = task_loss(outputs.logits, targets["labels"])
        elif "start_positions" in targets:
            terms["ce"] = span_loss(outputs.start_logits, outputs.end_logits,
                                    targets["start_positions"], targets["end_positions"])
        if self.weights.kd > 0 and (model.training or contrast is not None):
            teacher_out = self.teacher_logits(inputs, idx)
            t = self.weights.kd_temperature
            if hasattr(outputs, "start_logits"):
                terms["kd"] = (kd_loss(outputs.start_logits, teacher_out.start_logits, t)
                               + kd_loss(outputs.end_logits, teacher_out.end_logits, t)) / 2
            else:
                terms["kd"] = kd_loss(outputs.logits, teacher_out.logits, t)
        if (model.training if contrast is None else contrast) and idx is not None and self.banks:
            if rep is None:
                rep = self.tap.representation(inputs["attention_mask"])
            terms.update(self.contrastive_terms(idx, rep, targets.get("labels")))
        if model.training and self.regularizer is not None:
            terms["reg"] = self.regularizer()
        return terms

    def teacher_logits(self, inputs, idx):
        """The teacher's outputs on a batch: looked up (teacher.cache_outputs) or computed."""
        if self.teacher_outputs is not None and idx is not None:
            return self.teacher_outputs.lookup(idx, inputs["input_ids"].size(1), inputs["input_ids"].device)
        with torch.no_grad(), autocast(inputs["input_ids"].device, self.precision):
            return self.teacher(**inputs)

    def _get_eval_sampler(self, eval_dataset):
        # the order it is given: with group_by_length the Trainer would shuffle evaluation into length groups and
        # return predictions in that order; cap.evaluation sorts by length itself and puts them back
        if eval_dataset is None or self.args.world_size > 1:
            return None
        return SequentialSampler(eval_dataset)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        columns = getattr(dataset, "column_names", ())
        if self.args.train_sampling_strategy != "group_by_length" or "input_ids" not in columns:
            return super()._get_train_sampler(train_dataset)
        # grouped by the global batch: Accelerate deals its per-device slices out to the ranks, so together they
        # train on the batches one process with the global batch size would
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochSeededLengthGroupedSampler(global_batch, [len(ids) for ids in dataset["input_ids"]],
                                               self.args.seed)

    def release(self) -> None:
        """Detach the representation hooks from the model (a recipe builds one trainer per pruning step)."""
        if self.tap is not None:
            self.tap.remove()
            self.tap = None

    def contrastive_terms(self, idx, rep, labels) -> dict[str, torch.Tensor]:
        c = self.contrast
        if self.model.training:
            step = self.state.global_step
            self._micro = self._micro + 1 if step == self._seeded_step else 0
            self._seeded_step = step
            stream = self.args.process_index * self.args.gradient_accumulation_steps + self._micro
            self.generator.manual_seed((self.draw_seed + 1000 * stream) * 1_000_003 + step)
        # the supervised term needs class ids: none for QA and regression (spec §6)
        use_labels = labels is not None and not labels.is_floating_point()
        terms = {}
        for name, bank, extra in self._extras():
            terms[name] = contrastive_loss(
                rep, bank.view(), idx, extra, temperature=c.temperature, unsup_weight=c.unsup_weight,
                sup_weight=c.sup_weight if use_labels else 0.0, labels=labels if use_labels else None,
                bank_labels=bank.labels if use_labels else None, normalization=c.normalization,
            )
        return terms

    def _extras(self):
        """(name, bank, extra ids) for every bank holding a snapshot, in the order prc, fic, snc that fixes the draws
        (spec §2.7): one batch's draws."""
        for name, bank in self.banks.items():
            if bank.n_reps == 0:
                continue
            if self.fixed_extra_idx is not None:
                yield name, bank, self.fixed_extra_idx[name]
            else:
                yield name, bank, draw_extra_idx(bank.n_items, bank.n_reps, self.contrast.extra_examples,
                                                 self.generator)

    def skip_draws(self, batches: int) -> None:
        """Draw, and drop, the extras of `batches` batches: a rank passing only its share of the importance batches
        draws for each what one process passing all of them in order would."""
        for _ in range(batches):
            for _ in self._extras():
                pass

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        # CE and KD carry their config weights; contrastive and regulariser terms come weighted
        return sum(getattr(self.weights, name, 1.0) * value for name, value in terms.items())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms, outputs = self.loss_terms(model, inputs)
        loss = self.weighted(terms)
        contrast = self.weighted({k: terms[k] for k in self.banks if k in terms})
        if model.training and self.contrast.reaches != "both" and torch.is_tensor(contrast):
            from_scores = self.contrast.reaches == "weights"  # reaching the weights only: kept from the scores
            kept_from = [p for n, p in self.model.named_parameters()
                         if p.requires_grad and ("scores" in n) == from_scores]
            loss = loss + withheld_gradient(contrast, kept_from)
        if model.training and self._logs_after_this_update() and set(terms) & set(self.banks):
            task = self.weighted({k: terms[k] for k in TASK_TERMS if k in terms})
            if torch.is_tensor(task) and self.args.world_size == 1:  # autograd.grad would bypass DDP's reducer
                named = [(n, p) for n, p in self.model.base_model.encoder.named_parameters() if p.requires_grad]
                scores = ["scores" in n for n, _ in named]  # movement scores, apart from the weights they mask
                parts = {"scores": scores, "weights": [not s for s in scores]} if any(scores) else None
                # the contrastive pull as computed: with contrast.reaches, the part it is withheld from does not get it
                self._balance = gradient_balance(task, contrast, [p for _, p in named], parts=parts)
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
        if "wandb" in self.args.report_to:  # the run's x-axis (cap.tracking.UpdateAxis)
            logs["update"] = self.update_offset + self.state.global_step
        super().log(logs, *args, **kwargs)
