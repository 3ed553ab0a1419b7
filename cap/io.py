"""Files a crash cannot leave half-written: write to a temporary sibling, then rename."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def append_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Add rows to `run_dir/metrics.json`: a list with one row per (stage, split) evaluation."""
    path = Path(run_dir) / "metrics.json"
    write_json_atomic(path, read_json(path, []) + rows)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; a stale `final` from an earlier attempt is replaced."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest `checkpoint-<step>` folder the Trainer finished writing, or None.

    The Trainer writes `trainer_state.json` last, so a folder whose state file is missing or unreadable was cut
    short by a crash: it is reported and skipped, never resumed from."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    folders = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (FileNotFoundError, json.JSONDecodeError):
            print(f"skipping incomplete checkpoint {folder} (the run was stopped while writing it)")
    return None
