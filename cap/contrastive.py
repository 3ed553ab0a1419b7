"""CAP's contrastive term (spec §2) as a pure function, and the banks it reads from (spec §4, Q21)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SELF_LOGIT = -1e6  # the anchor's own detached copy (spec §2.3)


def draw_extra_idx(n_items: int, n_reps: int, extra_examples: int, generator: torch.Generator) -> torch.Tensor:
    """k = min(extra_examples // n_reps, n_items) distinct item ids, drawn from `generator` (spec Q4, Q5)."""
    k = min(extra_examples // max(n_reps, 1), n_items)
    return torch.randperm(n_items, generator=generator)[:k]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` [B, T, H] over the positions where `attention_mask` [B, T] is 1 (spec §1)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def contrastive_loss(rep, bank, idx, extra_idx, *, temperature: float, unsup_weight: float, sup_weight: float = 0.0,
                     labels=None, bank_labels=None, normalization: str = "original") -> torch.Tensor:
    """One bank's contrastive term, exactly spec §2.

    rep [B, H] current vectors (normalised here; the only thing with a gradient); bank [N, R, H] stored unit vectors;
    idx [B] and extra_idx [k] item ids; labels [B] and bank_labels [N] class ids, or None (no supervised term).
    Candidates: for each batch item its detached current vector then its R bank vectors, then the extras' R vectors
    each. The log-softmax runs over all candidates except the anchor's own copy."""
    if normalization not in ("original", "per_anchor"):
        raise ValueError(f"normalization={normalization!r}: use original or per_anchor")
    n_batch, n_reps = rep.size(0), bank.size(1)
    dtype = torch.promote_types(rep.dtype, torch.float32)
    device = rep.device
    z = F.normalize(rep.to(dtype), dim=-1)
    idx_cpu, extra_cpu = idx.to(bank.device), extra_idx.to(bank.device)
    own = bank[idx_cpu].to(device=device, dtype=dtype)                    # [B, R, H]
    extra = bank[extra_cpu].to(device=device, dtype=dtype).flatten(0, 1)  # [k*R, H]
    candidates = torch.cat([torch.cat([z.detach().unsqueeze(1), own], 1).flatten(0, 1), extra])  # [M, H]
    logits = z @ candidates.T / temperature                                # [B, M]
    self_col = torch.arange(n_batch, device=device) * (n_reps + 1)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(n_batch, device=device), self_col] = True
    logp = torch.log_softmax(logits.masked_fill(is_self, SELF_LOGIT), dim=-1)

    idx, extra_idx = idx.to(device).long(), extra_idx.to(device).long()
    cand_ids = torch.cat([idx.repeat_interleave(n_reps + 1), extra_idx.repeat_interleave(n_reps)])  # [M]
    loss = logp.new_zeros(())
    parts = [(unsup_weight, idx, cand_ids)]
    if labels is not None and sup_weight:
        labels, bank_labels = labels.to(device).long(), bank_labels.to(device).long()
        cand_labels = torch.cat([labels.repeat_interleave(n_reps + 1), bank_labels[extra_idx].repeat_interleave(n_reps)])
        parts.append((sup_weight, labels, cand_labels))
    for weight, anchor_keys, cand_keys in parts:
        if not weight:
            continue
        positive = (anchor_keys.unsqueeze(1) == cand_keys.unsqueeze(0)) & ~is_self   # [B, M]
        n_pos = positive.sum(1)
        pos_logp = logp.masked_fill(~positive, 0.0)
        mean_per_anchor = pos_logp.sum(1) / n_pos.clamp_min(1)
        if normalization == "original":
            # (-w) * Σ_b mean_b / (number of nonzero positive log-probs), in the original's order
            loss = loss + (-weight) * mean_per_anchor.sum() / (pos_logp != 0).sum().clamp_min(1)
        else:
            has_pos = n_pos > 0
            loss = loss + (-weight) * mean_per_anchor[has_pos].sum() / has_pos.sum().clamp_min(1)
    return loss


class RepresentationBank:
    """Preallocated storage [N, R_max, H] of unit vectors: row i = training item i, column r = snapshot r.

    Appending a snapshot writes into the next free column: nothing is reallocated or copied (spec Q21).
    `storage` gives the bank memory made elsewhere (one copy shared by the processes of a node: `cap.banks`); then
    only a process with `writes` writes into it, and `sync` runs after every write (the others wait there)."""

    def __init__(self, n_items: int, dim: int, max_reps: int, *, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", labels: torch.Tensor | None = None,
                 storage: torch.Tensor | None = None, writes: bool = True, sync: Callable[[], None] | None = None):
        device = torch.device(device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        if storage is None:
            storage = torch.empty(n_items, max_reps, dim, dtype=dtype, device=device, pin_memory=pin)
        elif storage.shape != (n_items, max_reps, dim) or storage.dtype != dtype:
            raise ValueError(f"storage {tuple(storage.shape)} {storage.dtype} is not [{n_items}, {max_reps}, {dim}] "
                             f"{dtype}")
        self.storage, self.writes, self.sync = storage, writes, sync
        self.n_reps = 0
        self.labels = None if labels is None else labels.long().to(device)

    @property
    def n_items(self) -> int:
        return self.storage.size(0)

    @property
    def max_reps(self) -> int:
        return self.storage.size(1)

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    def view(self) -> torch.Tensor:
        """[N, R, H]: the filled snapshots (a view of the storage, no copy)."""
        return self.storage[:, : self.n_reps]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """[b, R, H] for item ids `idx` [b]."""
        return self.view()[idx.to(self.storage.device)]

    def append(self, snapshot: torch.Tensor) -> None:
        """Store `snapshot` [N, H] (unit vectors) as the next column."""
        if self.n_reps == self.max_reps:
            raise RuntimeError(f"bank is full ({self.max_reps} snapshots); build it with a larger max_reps")
        if snapshot.shape != (self.n_items, self.storage.size(2)):
            raise ValueError(f"snapshot {tuple(snapshot.shape)} does not fit a bank of {self.n_items} x "
                             f"{self.storage.size(2)}")
        self._write(self.n_reps, snapshot[:, None])
        self.n_reps += 1

    def fill(self, vectors: torch.Tensor) -> None:
        """Make `vectors` [N, R, H] the bank's snapshots (a saved bank read back)."""
        if vectors.size(1) > self.max_reps:
            raise RuntimeError(f"{vectors.size(1)} snapshots do not fit a bank of {self.max_reps}")
        self._write(0, vectors)
        self.n_reps = vectors.size(1)

    def _write(self, start: int, vectors: torch.Tensor) -> None:
        if self.writes:
            self.storage[:, start:start + vectors.size(1)].copy_(vectors)
        if self.sync is not None:
            self.sync()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"vectors": self.view().contiguous(), "max_reps": torch.tensor(self.max_reps)}
        if self.labels is not None:
            state["labels"] = self.labels
        return state

    def save(self, path: Path) -> None:
        """safetensors, written atomically (temporary file, then rename)."""
        from cap.io import save_tensors_atomic

        save_tensors_atomic({k: v.cpu() for k, v in self.state_dict().items()}, path)

    @classmethod
    def load(cls, path: Path, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> "RepresentationBank":
        from safetensors.torch import load_file

        state = load_file(str(path))
        vectors = state["vectors"]
        bank = cls(vectors.size(0), vectors.size(2), int(state["max_reps"]), dtype=dtype or vectors.dtype,
                   device=device, labels=state.get("labels"))
        bank.fill(vectors)
        return bank
