"""The banks of spec §4: which ones a config builds, encoding a model into one (a batched, no-grad pass over the
training set, written straight into a RepresentationBank in dataset order), PrC or the next SnC snapshot, and their
files. Under several processes each rank encodes a contiguous shard and the shards are gathered, so every rank ends
with the same bank."""
from __future__ import annotations

import math
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cap.contrastive import RepresentationBank
from cap.distributed import all_agree, barrier, broadcast, local_process, this_process
from cap.io import crash_point, file_problem
from cap.models import RepresentationTap
from cap.precision import autocast, full_precision

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def by_length(dataset) -> list[int]:
    """The rows of `dataset` from the shortest to the longest (stable): batches of similar length, little padding."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


@torch.no_grad()
def forward_pass(model, dataset, collator, collect, *, batch_size: int = 128, precision: str = "fp32",
                 train_mode: bool = False, seed: int | None = None, sort_by_length: bool = False,
                 desc: str = "encoding", shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """{name: [N, *shapes[name]] float32}: per-example tensors of a batched no-grad pass of `model` over `dataset`, in
    dataset order, taken from each batch by `collect(outputs, batch)`. Under several processes each rank passes a
    contiguous shard and the shards are gathered, so every rank returns all rows.

    Eval mode unless `train_mode` (spec Q7); its dropout then draws from a forked RNG seeded with `seed`: the global
    RNG does not move, and a resumed run encodes what an uninterrupted one did. `sort_by_length` runs the shard in
    batches of similar length (the outputs are put back in dataset order: they differ only by float rounding)."""
    rank, world = this_process()
    n = len(dataset)
    shard = -(-n // world)
    part = dataset.select(range(rank * shard, min(n, (rank + 1) * shard)))
    order = by_length(part) if sort_by_length else None
    if order is not None:
        part = part.select(order)
    columns = [c for c in MODEL_INPUTS if c in dataset.column_names]
    # its own generator: encoding must not move the global RNG, or a resumed run would shuffle differently
    loader = DataLoader(part.select_columns(columns), batch_size=batch_size, shuffle=False, collate_fn=collator,
                        generator=torch.Generator())
    device = next(model.parameters()).device
    was_training = model.training
    model.train(train_mode)
    out: dict[str, list[torch.Tensor]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            for batch in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(device, precision):
                    outputs = model(**batch)
                with full_precision(device):
                    for name, value in collect(outputs, batch).items():
                        out.setdefault(name, []).append(value.float())
        finally:
            model.train(was_training)
    tensors = {name: torch.cat(out[name]) if name in out else torch.empty(0, *shape, device=device)
               for name, shape in shapes.items()}
    if order is not None:  # back to dataset order
        position = torch.as_tensor(order, device=device)
        tensors = {name: torch.empty_like(t).index_copy_(0, position, t) for name, t in tensors.items()}
    return {name: _gather_shards(t, shard, n) for name, t in tensors.items()} if world > 1 else tensors


def sentence_vectors(tap: RepresentationTap, batch) -> torch.Tensor:
    """[B, H] L2-normalised float32 sentence vectors of the forward `tap` just watched: what a bank stores."""
    return F.normalize(tap.representation(batch["attention_mask"]).float(), dim=-1)


def encode_vectors(model, dataset, collator, *, pooling: str = "cls", **kwargs) -> torch.Tensor:
    """[N, H] L2-normalised float32 sentence vectors of `dataset` (`forward_pass`, whose keywords it takes)."""
    tap = RepresentationTap(model, pooling)
    try:
        vectors = forward_pass(model, dataset, collator,
                               lambda outputs, batch: {"vectors": sentence_vectors(tap, batch)},
                               shapes={"vectors": (model.config.hidden_size,)}, **kwargs)
    finally:
        tap.remove()
    return vectors["vectors"]


def _gather_shards(local: torch.Tensor, shard: int, n: int) -> torch.Tensor:
    padded = torch.zeros(shard, *local.shape[1:], device=local.device)
    padded[: local.size(0)] = local
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n]


def encode_into(bank: RepresentationBank, model, dataset, collator, **kwargs) -> None:
    """Encode `dataset` with `model` and append the result to `bank` as its next snapshot."""
    bank.append(encode_vectors(model, dataset, collator, **kwargs).to(bank.storage.device))


def encode_snapshot(banks: dict[str, RepresentationBank], index: int, model, dataset, collator, **kwargs) -> str | None:
    """Encode `model` into PrC at `index` 0 (CAP-f's first step, CAP-m's first epoch), else as the next SnC snapshot
    (spec §4). Returns the bank's name; None when that bank is off."""
    name = "prc" if index == 0 else "snc"
    if name not in banks:
        return None
    encode_into(banks[name], model, dataset, collator, desc=f"{name} bank", **kwargs)
    return name


BANK_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class BankSettings:
    """What the config says about the banks, read once (`from_config`, after `auto` pooling and precision are
    resolved): which banks a run builds, how they are stored, and how a model is encoded into one."""

    enabled: bool            # contrast.enabled: false builds none (the plain pruning baselines)
    prc: bool
    snc: bool
    fic: bool
    dtype: torch.dtype       # bank.dtype
    device: str              # bank.device
    pooling: str             # contrast.pooling: the sentence representation
    batch_size: int          # trainer.eval_batch_size: encoding batches
    precision: str           # trainer.precision
    sort_by_length: bool     # data.group_by_length: encoding batches of similar length
    snapshot_train_mode: bool  # bank.snapshot_train_mode: movement snapshots encoded with dropout on (spec Q7)

    @classmethod
    def from_config(cls, cfg) -> BankSettings:
        c = cfg.contrast
        return cls(enabled=bool(c.enabled), prc=bool(c.prc), snc=bool(c.snc), fic=bool(c.fic),
                   dtype=BANK_DTYPES[cfg.bank.dtype], device=cfg.bank.device, pooling=c.pooling,
                   batch_size=cfg.trainer.eval_batch_size, precision=cfg.trainer.precision,
                   sort_by_length=bool(cfg.data.group_by_length),
                   snapshot_train_mode=bool(cfg.bank.snapshot_train_mode))

    @property
    def encoding(self) -> dict:
        """The keyword arguments of `encode_into` / `encode_snapshot` / `load_or_encode`."""
        return dict(pooling=self.pooling, batch_size=self.batch_size, precision=self.precision,
                    sort_by_length=self.sort_by_length)


def build_banks(settings: BankSettings, data, dim: int, n_snapshots: int) -> dict[str, RepresentationBank]:
    """The banks `settings` enable for the training set of `data` (a TaskData), `dim` wide, in the loss order
    PrC, FiC, SnC (spec §2.7); SnC has room for `n_snapshots`. Each holds the training labels, none for QA and
    regression. Empty when `contrast.enabled=false` (the plain pruning baselines)."""
    if not settings.enabled:
        return {}
    labels = None if data.spec.is_qa or data.spec.is_regression else torch.tensor(data.train["labels"])
    sizes = {"prc": int(settings.prc), "fic": int(settings.fic), "snc": n_snapshots if settings.snc else 0}
    return {name: make_bank(len(data.train), dim, reps, dtype=settings.dtype, device=settings.device, labels=labels,
                            name=name) for name, reps in sizes.items() if reps > 0}


def make_bank(n_items: int, dim: int, max_reps: int, *, dtype: torch.dtype, device: str, labels=None,
              name: str = "bank", shared: bool | None = None) -> RepresentationBank:
    """A RepresentationBank; `shared` (default: whenever several processes of a launch share a node and the bank is
    on the CPU) keeps one copy per node in shared memory, written by the node's first process: every rank holds the
    same bank, so N processes need not hold N copies."""
    if shared is None:
        shared = torch.device(device).type == "cpu" and local_process().world > 1
    storage = shared_storage((n_items, max_reps, dim), dtype, name) if shared else None
    if storage is None:
        return RepresentationBank(n_items, dim, max_reps, dtype=dtype, device=device, labels=labels)
    return RepresentationBank(n_items, dim, max_reps, dtype=dtype, device=device, labels=labels, storage=storage,
                              writes=local_process().rank == 0, sync=barrier)


def shared_storage(shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor | None:
    """A tensor in this node's shared memory (/dev/shm), one for the node's processes: the node's first process
    makes the file, every process maps it, and the name is removed once all have it, so the memory goes when the
    last process ends (a killed run leaves nothing behind). The launch's processes call it together. None, with a
    warning, where the node's shared memory is too small for it (each process then keeps its own copy)."""
    token = broadcast(uuid.uuid4().hex[:12])  # one name for the launch, another for every launch
    folder = Path(os.environ.get("CAP_SHM_DIR", "/dev/shm"))
    path, numel = folder / f"cap-{token}-{name}", math.prod(shape)
    first = local_process().rank == 0
    room = folder.is_dir() and shutil.disk_usage(folder).free > 1.1 * numel * dtype.itemsize
    if not all_agree(room):
        warnings.warn(f"the {name} bank ({numel * dtype.itemsize / 2**30:.1f} GiB) does not fit in {folder} on "
                      "every node: each process keeps its own copy (more room: a larger /dev/shm, e.g. docker "
                      "--shm-size, or CAP_SHM_DIR=<a tmpfs folder>)", stacklevel=2)
        return None
    if first:
        with open(path, "wb") as file:
            file.truncate(numel * dtype.itemsize)
    barrier()
    storage = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
    barrier()
    if first:
        path.unlink()
    return storage


def save_banks(banks: dict[str, RepresentationBank], folder) -> None:
    """Write every bank to `folder/<name>.safetensors`; only rank 0 writes (every rank holds the same banks)."""
    if not this_process().main:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name, bank in banks.items():
        bank.save(folder / f"{name}.safetensors")


def load_banks(banks: dict[str, RepresentationBank], folder) -> None:
    """Fill `banks` in place from `folder` (the storage is kept: no reallocation)."""
    for name, bank in banks.items():
        bank.fill(RepresentationBank.load(folder / f"{name}.safetensors", dtype=bank.storage.dtype).view())


def load_or_encode(name: str, banks: dict[str, RepresentationBank], folder, model, dataset, collator, **kwargs):
    """Give `banks[name]` one snapshot of `model`: loaded from `folder` if an earlier attempt saved it, else
    encoded now and saved (the FiC bank of a resumed run is not encoded twice)."""
    if name not in banks:
        return
    # every rank takes the same branch: rank 0 writes the file only after encoding, which waits for all ranks
    path = folder / f"{name}.safetensors"
    problem = file_problem(path) if path.exists() else None
    if problem:
        print(f"{problem}: encoding the {name} bank again")
    if path.exists() and not problem:
        load_banks({name: banks[name]}, folder)
    else:
        encode_into(banks[name], model, dataset, collator, desc=f"{name} bank", **kwargs)
        save_banks({name: banks[name]}, folder)
        crash_point("bank_encoded")
