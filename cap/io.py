"""Files a crash cannot leave half-written (write to a temporary sibling, then rename), the check that a file read
back on resume is whole, the deletion of a finished run's Trainer checkpoints, and `crash_point`, the hook tests use
to kill a run at a chosen phase. Which process of a launch writes is `cap.distributed`; what a stage saves, and in
which order, is `cap.stages`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from cap.distributed import this_process


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, written to a temporary sibling and renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def append_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Add rows to `run_dir/metrics.json`: a list with one row per (stage, split) evaluation. A row takes the place
    of an earlier one of the same (stage, split): a stage redone after a crash is listed once, where it was."""
    path = Path(run_dir) / "metrics.json"
    new = {(r.get("stage"), r.get("split")): r for r in rows}
    merged = [new.pop((r.get("stage"), r.get("split")), r) for r in read_json(path, [])]
    write_json_atomic(path, merged + list(new.values()))


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place. A stale `final` from an earlier attempt is renamed aside first, so
    a crash at any moment leaves the old folder or the new one, never a half-deleted one."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def publish_linked(source: Path, final: Path) -> None:
    """Publish (as `publish_dir`) a folder holding the files of `source`: hard links, so they take no more disk, or
    copies where the file system has no hard links. Safe because published files are never rewritten in place."""
    tmp = final.with_name(f"{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    publish_dir(tmp, final)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def remove_checkpoints(ckpt_dir: Path) -> None:
    """Delete the Trainer checkpoints of a finished stage or run (`trainer.keep_checkpoints=false`). Call it only
    once the marker that says finished is written. The folder is first renamed aside, so a run killed while
    deleting never leaves a half-deleted checkpoint that a redone stage could resume from; a later call finishes
    the deletion."""
    ckpt_dir = Path(ckpt_dir)
    trash = ckpt_dir.with_name(f".{ckpt_dir.name}.deleted")
    if ckpt_dir.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(ckpt_dir, trash)
        crash_point("removing_checkpoints")
    shutil.rmtree(trash, ignore_errors=True)


def file_problem(path: Path) -> str | None:
    """What makes `path` unusable (missing, cut short, unreadable), or None when it is whole.

    Checks the structure a truncation breaks, without reading the data: safetensors' header against the file size,
    the zip directory at the end of torch.save files (.pt .pth .bin), JSON syntax (.json and DONE markers)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            zipfile.ZipFile(path).close()
        elif path.suffix == ".json" or path.name == "DONE":
            json.loads(path.read_text())
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as err:
        return f"{path} is cut short or corrupt ({err})"
    return None


def first_problem(paths) -> str | None:
    """The first of `paths` that is not whole, as `file_problem` says; None when all are."""
    return next((problem for problem in map(file_problem, paths) if problem), None)


def last_complete_checkpoint(ckpt_dir: Path, required: tuple[str, ...] = ()) -> str | None:
    """The newest `checkpoint-<step>` folder the Trainer finished writing and that is still whole, or None.

    The Trainer writes `trainer_state.json` last, so a folder whose state file is missing or unreadable was cut
    short by a crash; a folder with a truncated file was damaged later. Either is reported and skipped, never
    resumed from. `required` names files that callbacks add after the Trainer (in their on_save); a folder without
    one of them is incomplete too."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    folders = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        files = [folder / "trainer_state.json", *(folder / name for name in required),
                 *sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))]
        problem = first_problem(files)
        if problem is None:
            return str(folder)
        print(f"skipping checkpoint {folder}: {problem} (the run was stopped while writing it, or it was damaged)")
    return None


_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook: with `CAP_KILL_AT=<name>[:<n>]` in the environment, the process kills itself (SIGKILL: no cleanup,
    no `finally`) the n-th time (default 1) it reaches the point `name`; with `CAP_KILL_RANK=<r>`, only rank r of a
    launch does. tests/test_resume.py stops runs this way
    at every phase and checks that the same command, run again, ends as an uninterrupted run.

    Points: bank_encoded, importance_done, selected_saved, checkpoint_saved, stage_saved, removing_checkpoints,
    epoch_evaluated, model_published, export_written."""
    target = os.environ.get("CAP_KILL_AT")
    if not target or target.partition(":")[0] != name:
        return
    if os.environ.get("CAP_KILL_RANK", str(this_process().rank)) != str(this_process().rank):
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(target.partition(":")[2] or 1):
        print(f"CAP_KILL_AT={target}: killing the run here", flush=True)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class CrashPoints(TrainerCallback):
    """`crash_point("checkpoint_saved")` once the Trainer and the callbacks before this one wrote a checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        crash_point("checkpoint_saved")
