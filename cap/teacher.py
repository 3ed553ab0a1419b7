"""The frozen teacher, run once: its logits for every training example (KD) and its FiC bank from the same pass.

The teacher is in eval mode and never trained, and every update feeds it the same tokens of the same examples, so
its outputs cannot change during a run: `teacher.cache_outputs=true` computes them once, before training, and the
Trainer looks them up by example id (`idx`) instead of running the teacher again in every update. They are saved
with the banks, so a resumed run loads them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding

from cap.banks import BankSettings, forward_pass, load_banks, load_or_encode, save_banks, sentence_vectors
from cap.distributed import this_process
from cap.io import crash_point, file_problem, save_tensors_atomic
from cap.models import RepresentationTap

LOGITS_FILE = "teacher_logits.safetensors"


class TeacherOutputs:
    """The teacher's logits per training example: `logits` [N, C], or QA's `start_logits` / `end_logits` [N, L] at
    every position of a window padded to L = data.max_seq_length. `lookup` gives a batch's, as the teacher's forward
    on that batch would."""

    def __init__(self, logits: dict[str, torch.Tensor]):
        self.logits = logits

    def lookup(self, idx: torch.Tensor, length: int | None = None, device=None):
        """An object with the batch's logits as attributes (rows `idx`; QA: the first `length` positions)."""
        from types import SimpleNamespace

        rows = idx.long().to(next(iter(self.logits.values())).device)
        take = {name: t[rows] if name == "logits" else t[rows, :length] for name, t in self.logits.items()}
        return SimpleNamespace(**{name: t.to(device) for name, t in take.items()})

    def save(self, path: Path) -> None:
        save_tensors_atomic({k: v.contiguous().cpu() for k, v in self.logits.items()}, path)

    @classmethod
    def load(cls, path: Path) -> TeacherOutputs:
        from safetensors.torch import load_file

        return cls(load_file(str(path)))


@dataclass(frozen=True)
class TeacherPassSettings:
    """What the teacher's pass needs of the config: whether to cache its outputs (`teacher.cache_outputs`, with KD
    on: nothing else reads them), how to encode (the banks' settings) and SQuAD's window (`data.max_seq_length`)."""
    cache: bool
    banks: BankSettings
    max_seq_length: int

    @classmethod
    def from_config(cls, cfg) -> TeacherPassSettings:
        return cls(cache=bool(cfg.teacher.cache_outputs and cfg.kd.weight > 0), banks=BankSettings.from_config(cfg),
                   max_seq_length=int(cfg.data.max_seq_length))


def teacher_pass(settings: TeacherPassSettings, setup, banks: dict, folder: Path, device) -> TeacherOutputs | None:
    """Fill the FiC bank (when `banks` has one) and, with `settings.cache`, return the teacher's logits for every
    training example, in one pass (its files in `folder`, loaded from there by a resumed run). Without the cache
    the FiC bank is encoded as before and the teacher runs in every update."""
    teacher, train = setup.teacher.to(device), setup.data.train
    encoding = settings.banks.encoding
    if not settings.cache:
        load_or_encode("fic", banks, folder, teacher, train, setup.collator, **encoding)
        return None
    path = folder / LOGITS_FILE
    saved = [path] + ([folder / "fic.safetensors"] if "fic" in banks else [])
    damaged = [(p, problem) for p in saved if p.exists() and (problem := file_problem(p))]
    for p, problem in damaged:
        print(f"{problem}: " + ("computing the teacher's logits again" if p == path else "encoding the fic bank again"))
    if not damaged and all(p.exists() for p in saved):
        load_banks({k: v for k, v in banks.items() if k == "fic"}, folder)
        outputs = TeacherOutputs.load(path)
        print(f"teacher.cache_outputs: the teacher's logits (and FiC) loaded from {folder}")
        return outputs
    qa = setup.data.spec.is_qa
    # QA logits are cached at every position of a full window, so any batch's padding finds its positions
    collator = (DataCollatorWithPadding(setup.tokenizer, padding="max_length", max_length=settings.max_seq_length)
                if qa else setup.collator)
    names = ("start_logits", "end_logits") if qa else ("logits",)
    width = settings.max_seq_length if qa else teacher.config.num_labels
    fic = "fic" in banks
    tap = RepresentationTap(teacher, encoding["pooling"]) if fic else None

    def collect(outputs, batch):
        taken = {name: getattr(outputs, name) for name in names}
        if fic:
            taken["fic"] = sentence_vectors(tap, batch)
        return taken

    shapes = {name: (width,) for name in names} | ({"fic": (teacher.config.hidden_size,)} if fic else {})
    try:
        out = forward_pass(teacher, train, collator, collect, shapes=shapes, desc="teacher",
                           **{k: v for k, v in encoding.items() if k != "pooling"})
    finally:
        if tap is not None:
            tap.remove()
    if fic:
        banks["fic"].append(out.pop("fic").to(banks["fic"].storage.device))
        save_banks({"fic": banks["fic"]}, folder)
    outputs = TeacherOutputs(out)
    if this_process().main:
        folder.mkdir(parents=True, exist_ok=True)
        outputs.save(path)
    crash_point("bank_encoded")
    print(f"teacher.cache_outputs: the teacher ran once over {len(train)} training examples; its logits are reused "
          "in every update" + (" (and gave the FiC bank)" if fic else ""))
    return outputs
