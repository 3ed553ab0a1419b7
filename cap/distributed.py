"""The processes of one launch (`torchrun`, `accelerate launch`, `srun torchrun`): which one this is, the rule for who
writes, and what the processes agree on before they train.

One rule for files: everything a run writes (run dir, teacher cache, Hydra's files, stage files, banks, exports,
W&B) is written by the main process (rank 0) alone; the others wait at a barrier and then read it. The processes
join their group at the start of a run (`join`, through Accelerate, as the Trainer would later), so that they can
agree on paths, wait for each other and take turns before any training: tokenised data is made by the main process
first and loaded by the others (`main_first`), a teacher is fine-tuned under one lock across jobs (`job_lock`).

`trainer.batch_size` is the global batch: examples per update over all processes and accumulation steps.
`batch_split` turns it into the per-device batch and the gradient accumulation for the launch's world size, so a
preset runs the same updates, warm-up and pruning schedule on 1, 2, 4 or 8 processes.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from cap.errors import UserError


class Process(NamedTuple):
    rank: int
    world: int

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files: every rank holds the same model, masks and banks."""
        return self.rank == 0


def this_process() -> Process:
    """(rank, number of processes) of this process: the torch.distributed group's once joined, before that the
    launcher's environment (RANK, WORLD_SIZE); (0, 1) when launched alone."""
    if dist.is_available() and dist.is_initialized():
        return Process(dist.get_rank(), dist.get_world_size())
    return Process(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def local_process() -> Process:
    """(rank on this node, processes on this node), from the launcher's LOCAL_RANK / LOCAL_WORLD_SIZE."""
    rank, world = this_process()
    return Process(int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def join() -> None:
    """Join the launch's process group now (a no-op alone or when joined): through Accelerate's PartialState, with
    the device and backend the Trainer's TrainingArguments would choose (gloo on CPU, NCCL on GPUs)."""
    if this_process().world > 1 and not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def joined() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every process of the launch is here (a no-op alone)."""
    if joined():
        dist.barrier()


def broadcast(value):
    """The main process's `value`, on every process (any picklable object)."""
    if not joined():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_agree(flag: bool) -> bool:
    """Whether `flag` holds on every process."""
    if not joined():
        return flag
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


@contextmanager
def main_first():
    """The main process runs the block first (making what it makes: tokenised data in the cache); the others wait,
    then run it (loading what the main process made)."""
    main = this_process().main
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


@contextmanager
def job_lock(path: Path, what: str, poll_s: float = 20.0):
    """Hold `path` (a lock file, `filelock`) for this job while the block runs: jobs needing the same thing take
    turns, across processes and machines sharing the file system. The main process holds it; the others wait with
    it in collectives at most `poll_s` apart (no collective timeout, however long the other job takes). The kernel
    releases the lock of a killed holder, so a crashed job does not block the next one."""
    from filelock import FileLock, Timeout

    main = this_process().main
    lock = FileLock(str(path)) if main else None
    wait = 0.0  # the first try does not wait, so that a busy lock is said at once
    while True:
        acquired = False
        if main:
            try:
                lock.acquire(timeout=wait)
                acquired = True
            except Timeout:
                if not wait:
                    print(f"waiting for another job to finish {what} (lock {path})", flush=True)
        if broadcast(acquired):
            break
        wait = poll_s
    try:
        yield
    finally:
        if main:
            lock.release()


def batch_split(global_batch: int, device_batch: int | None, world: int) -> tuple[int, int]:
    """(examples per device per forward, gradient accumulation steps) that make `global_batch` examples per update
    on `world` processes: `device_batch` (None: as large as it can be, global_batch / world) and the accumulation
    that fills the rest. UserError, in one line, where the numbers do not divide."""
    if global_batch % world:
        raise UserError(f"trainer.batch_size={global_batch} (the global batch) does not split over {world} processes: "
                        f"use a multiple of {world}, or launch a number of processes that divides it")
    per_process = global_batch // world
    if device_batch is None:
        return per_process, 1
    if device_batch < 1 or per_process % device_batch:
        raise UserError(f"trainer.device_batch_size={device_batch}: each of the {world} processes takes "
                        f"{per_process} examples of the global batch of {global_batch} per update; use a divisor of "
                        f"{per_process} (the rest is made up by gradient accumulation), or null")
    return device_batch, per_process // device_batch


def describe_batch(global_batch: int, device_batch: int, accumulation: int, world: int) -> str:
    return (f"batch: {global_batch} examples per update = {world} process{'es' if world > 1 else ''} x "
            f"{device_batch} per device x {accumulation} accumulation step{'s' if accumulation > 1 else ''}")
