"""Supervised and distillation losses (spec §3), as pure functions of logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification (`logits` [B, C], `labels` [B] long); MSE for regression ([B, 1], float)."""
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """Extractive-QA loss: mean of the start and end cross-entropies ([B, T] logits, [B] positions).

    Positions outside the sequence are clamped to T and ignored, as in the original and the HF QA heads.
    """
    length = start_logits.size(1)
    start = start_positions.long().clamp(0, length)
    end = end_positions.long().clamp(0, length)
    loss_start = F.cross_entropy(start_logits.float(), start, ignore_index=length)
    loss_end = F.cross_entropy(end_logits.float(), end, ignore_index=length)
    return (loss_start + loss_end) / 2


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean; for a regression head ([B, 1]) the MSE to the teacher."""
    if student_logits.size(-1) == 1:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def withheld_gradient(term: torch.Tensor, params) -> torch.Tensor:
    """A zero-valued tensor whose gradient on `params` is minus `term`'s: added to a loss that holds `term`, it keeps
    `term`'s gradient from `params` (they still get every other term's) and changes no value logged. Costs one
    backward of `term` (`contrast.reaches`: the contrastive terms kept from the movement scores or from the weights)."""
    params = list(params)
    zero = torch.zeros((), device=term.device)
    if not term.requires_grad:
        return zero
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return zero - sum(((g.detach() * (p - p.detach())).sum() for g, p in zip(grads, params) if g is not None), zero)


def gradient_balance(task: torch.Tensor, contrast: torch.Tensor, params, parts=None) -> dict[str, float]:
    """How the two parts of CAP's loss pull on `params`: the norms of the gradients of `task` (the weighted CE+KD)
    and of `contrast` (the weighted contrastive terms), and the cosine between them. `parts` maps a name to a boolean
    per parameter (e.g. `scores`: "is a movement score"): the same three figures for those parameters alone, suffixed
    `_<name>`, from the same gradients. The graph is kept, so the training step's own backward can follow; `.grad`
    is left untouched."""
    params = list(params)

    def flat(loss):
        if not loss.requires_grad:  # e.g. every contrastive weight 0: a term that pulls on nothing
            return [torch.zeros_like(p).reshape(-1).float() for p in params]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)]

    def figures(a, b, suffix=""):
        a, b = torch.cat(a), torch.cat(b)
        norm_a, norm_b = a.norm(), b.norm()
        return {f"grad_norm_task{suffix}": norm_a.item(), f"grad_norm_contrast{suffix}": norm_b.item(),
                f"grad_cosine{suffix}": (a @ b / (norm_a * norm_b).clamp_min(1e-12)).item()}

    a, b = flat(task), flat(contrast)
    out = figures(a, b)
    for name, keep in (parts or {}).items():
        if any(keep):
            out |= figures([g for g, k in zip(a, keep) if k], [g for g, k in zip(b, keep) if k], f"_{name}")
    return out
