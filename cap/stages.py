"""What a stage leaves on disk, so that a killed run resumes (spec, "Beyond the original": every stage checkpointed):
is it done, restore it, save its selection, save its result, the Trainer checkpoint to resume from, what is
damaged. The recipes say what to compute; this module says what is saved, where, and in which order.

A stage is a CAP-f step (`StructuredStage`, `stages/<sparsity>/`), a CAP-m / CAP-soft run (`MovementStage`) or a
fine-tuning run (`Stage`). Files are written whole or not at all (`cap.io`); only the main process writes, after
collectives (importance, training, encoding) that every rank passes, so every rank reads the same files. A file
found damaged is reported and the step that wrote it done again. `crash_point` names the phases tests kill runs at.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from cap.banks import load_banks, save_banks
from cap.distributed import this_process
from cap.export import export_pruned
from cap.io import (append_metrics, crash_point, file_problem, first_problem, last_complete_checkpoint, publish_dir,
                    publish_linked, read_json, remove_checkpoints, save_tensors_atomic, write_json_atomic)
from cap.model_card import CardSettings, write_card
from cap.sparse import save_sparse


@dataclass(frozen=True)
class StageSettings:
    """What the stages need of the config: resume or start over (`trainer.resume`), keep the Trainer checkpoints of
    a finished stage (`trainer.keep_checkpoints`), what the model cards say, and whether a movement run's scores are
    per entry (`prune.granularity=element`: a `sparse/` folder) or per unit (`export/`)."""
    resume: bool
    keep_checkpoints: bool
    card: CardSettings
    element_scores: bool = True

    @classmethod
    def from_config(cls, cfg) -> StageSettings:
        return cls(resume=bool(cfg.trainer.resume), keep_checkpoints=bool(cfg.trainer.keep_checkpoints),
                   card=CardSettings.from_config(cfg),
                   element_scores=OmegaConf.select(cfg, "prune.granularity", default="element") == "element")


SAVED_CONFIG = Path(".hydra") / "config.yaml"  # Hydra's record of a run's config, rewritten at every launch
STARTED_CONFIG = Path(".hydra") / "config.started.yaml"  # the record as the run's first launch left it


def keep_started_config(run_dir: Path) -> None:
    """Keep the run's saved config as its first launch wrote it (`.hydra/config.started.yaml`). Hydra writes
    `.hydra/config.yaml` anew at every launch, a re-launch of a finished run included (a sweep run again to resume
    its unfinished runs): composed from the defaults of that day, not those the run ran with."""
    saved, started = run_dir / SAVED_CONFIG, run_dir / STARTED_CONFIG
    if this_process().main and saved.is_file() and not started.exists():
        _copy_atomic(saved, started)


def already_finished(run_dir: Path) -> str:
    """The line a re-launched finished run prints. Its `.hydra/config.yaml` is put back to the one it ran with (kept
    by `keep_started_config`): nothing ran under the new launch's."""
    saved, started = run_dir / SAVED_CONFIG, run_dir / STARTED_CONFIG
    if this_process().main and started.is_file() and saved.read_bytes() != started.read_bytes():
        _copy_atomic(started, saved)
    return f"already finished: {run_dir} (trainer.resume=false starts over)"


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class Stage:
    """A folder of work that a killed run resumes: its Trainer checkpoints (`checkpoints/`) while it trains."""

    def __init__(self, folder: Path, settings: StageSettings):
        self.folder = Path(folder)
        self.checkpoints = self.folder / "checkpoints"
        self.card, self.resume, self.keep_checkpoints = settings.card, settings.resume, settings.keep_checkpoints
        self.writes = this_process().main

    def checkpoint(self, required: tuple[str, ...] = ()) -> str | None:
        """The Trainer checkpoint to resume from: the last complete one (`trainer.resume`), else None."""
        return last_complete_checkpoint(self.checkpoints, required) if self.resume else None

    def drop_checkpoints(self) -> None:
        """Delete the Trainer checkpoints (`trainer.keep_checkpoints=false`), once the marker that says finished is
        written; also finishes a deletion that a kill cut short."""
        if self.writes and not self.keep_checkpoints:
            remove_checkpoints(self.checkpoints)


class StructuredStage(Stage):
    """One CAP-f step, `stages/<sparsity>/` (spec §5.1): `selected/` (the masks and banks as chosen, saved before
    retraining, and the importance they were chosen by), the Trainer checkpoints while it retrains, then `model/`
    (folded), `masked_weights.safetensors`, `masks.safetensors`, and last `DONE` (its metrics rows)."""

    def __init__(self, run_dir: Path, sparsity: float, settings: StageSettings, banks):
        super().__init__(Path(run_dir) / "stages" / f"{sparsity:g}", settings)
        self.run_dir, self.banks, self.selected = Path(run_dir), banks, self.folder / "selected"

    def selection_files(self) -> list[Path]:
        """What `selected/` holds: the masks and the banks as they were when they were chosen."""
        return [self.selected / f"{name}.safetensors" for name in ("masks", *self.banks)]

    def result_files(self) -> list[Path]:
        """What a finished stage leaves besides `selected/`: the folded model, the weights folding zeroed, the masks."""
        return [self.folder / "model" / "model.safetensors", self.folder / "masked_weights.safetensors",
                self.folder / "masks.safetensors"]

    def done(self) -> bool:
        """Whether an earlier attempt finished this stage and left its files whole (`trainer.resume`). A damaged one
        is reported and loses its DONE marker: until it is redone, its files need not belong together."""
        if not (self.resume and (self.folder / "DONE").exists()):
            return False
        problem = first_problem([self.folder / "DONE", *self.result_files(), *self.selection_files()])
        if problem is None:
            return True
        print(f"{problem}: redoing stage {self.folder.name}")
        if self.writes:
            (self.folder / "DONE").unlink()
        return False

    def restore(self, model, masks) -> list[dict]:
        """Weights (unfolded), masks and banks as they were at the end of the finished stage; its metrics rows."""
        model.load_state_dict(load_file(str(self.folder / "model" / "model.safetensors")))
        masks.load_state_dict(load_file(str(self.folder / "masks.safetensors")))
        masks.unfold(model, load_file(str(self.folder / "masked_weights.safetensors")))
        load_banks(self.banks, self.selected)
        rows = read_json(self.folder / "DONE")["rows"]
        self.drop_checkpoints()  # what a kill during the deletion left
        return rows

    def load_selection(self, masks) -> bool:
        """Load the masks and banks that a killed attempt chose (`trainer.resume`): it must then train as if it had
        made the choice. False when there are none, or they are damaged (reported): the stage chooses again."""
        if not (self.resume and self.selected.exists()):
            return False
        problem = first_problem(self.selection_files())
        if problem:
            print(f"{problem}: choosing the heads and neurons of stage {self.folder.name} again")
            return False
        masks.load_state_dict(load_file(str(self.selected / "masks.safetensors")))
        load_banks(self.banks, self.selected)
        return True

    def save_selection(self, masks, importance: dict) -> None:
        """`selected/`, written whole before retraining: the new masks, the banks and the importance (for users who
        look at it; not resumed)."""
        if self.writes:
            tmp = self.folder / "selected.tmp"
            save_banks(self.banks, tmp)
            save_file(masks.state_dict(), str(tmp / "masks.safetensors"))
            save_file(importance, str(tmp / "importance.safetensors"))
            publish_dir(tmp, self.selected)
        crash_point("selected_saved")

    def save_result(self, model, masks, tokenizer, rows: list[dict]) -> None:
        """The retrained stage: its model folded, its metrics rows (also in the run's metrics.json), then DONE; its
        Trainer checkpoints are deleted."""
        if not self.writes:
            return
        self._save_folded(model, masks, tokenizer, rows)
        append_metrics(self.run_dir, rows)
        crash_point("stage_saved")
        write_json_atomic(self.folder / "DONE", {"rows": rows})
        self.drop_checkpoints()

    def _save_folded(self, model, masks, tokenizer, rows: list[dict]) -> None:
        """Save the model folded: `from_pretrained` on `model/` gives the pruned model, no hooks needed.

        The live model stays unfolded, as the original's: the next importance pass sees the masked units' weights
        (their importance is not 0, and counts in the per-layer normalisation, §5.1). The zeroed rows go to
        `masked_weights.safetensors`, from which a resumed run restores the live model to the bit."""
        zeroed = masks.fold(model)
        tmp = self.folder / "model.tmp"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_card(tmp, self.card, rows)
        masks.unfold(model, zeroed)
        publish_dir(tmp, self.folder / "model")
        save_tensors_atomic(zeroed, self.folder / "masked_weights.safetensors")
        save_tensors_atomic(masks.state_dict(), self.folder / "masks.safetensors")

    def publish_model(self, again: bool) -> None:
        """Make this stage's model the run's `model/` (hard links: no extra disk) when `again`, or when the run has
        none yet (a kill before it was published)."""
        final = self.run_dir / "model"
        if self.writes and (again or not (final / "model.safetensors").exists()):
            publish_linked(self.folder / "model", final)
            crash_point("model_published")


class MovementStage(Stage):
    """A CAP-m / CAP-soft run dir (spec §4 CAP-m/soft): `banks/` holds FiC and the PrC / SnC snapshots encoded so
    far, saved beside the epoch checkpoints (each with the sparsity controller's state when λ is steered);
    `metrics.json` one row per epoch and split; once finished `model/`, then `sparse/` (prune.granularity=element)
    or `masks.safetensors` and `export/` (structured: the heads and neurons removed, `cap.export.load_pruned`)."""

    CONTROLLER_FILE = "sparsity_controller.safetensors"

    def __init__(self, run_dir: Path, settings: StageSettings):
        super().__init__(run_dir, settings)
        self.banks = self.folder / "banks"
        self.last = self.folder / ("sparse" if settings.element_scores else "export")  # written last

    def finished(self) -> bool:
        """Whether an earlier attempt finished the run (`trainer.resume`)."""
        done = self.resume and (self.folder / "model" / "config.json").exists() and self.last.exists()
        if done:
            self.drop_checkpoints()
        return done

    def rows(self) -> list[dict]:
        return read_json(self.folder / "metrics.json", [])

    def resume_checkpoint(self, banks, controller) -> str | None:
        """The checkpoint to resume from, with the controller's state restored from it; None (start over) when the
        PrC / SnC snapshots that a resumed epoch starts from are not whole."""
        resume_from = self.checkpoint(required=(self.CONTROLLER_FILE,) if controller else ())
        snapshots = {k: self.banks / f"{k}.safetensors" for k in ("prc", "snc") if k in banks}
        problem = resume_from and first_problem(path for k, path in snapshots.items() if k == "prc" or path.exists())
        if problem:
            print(f"{problem}: training starts over")
            resume_from = None
        if controller is not None and resume_from:
            controller.load_state_dict(load_file(str(Path(resume_from) / self.CONTROLLER_FILE)))
        return resume_from

    def save_controller(self, controller, step: int) -> None:
        """Written after the Trainer's files: a checkpoint without it is incomplete (see `resume_checkpoint`)."""
        if self.writes:
            folder = self.checkpoints / f"checkpoint-{step}"
            save_tensors_atomic(controller.state_dict(), folder / self.CONTROLLER_FILE)

    def restore_snapshots(self, banks, epoch: int) -> None:
        """The banks as epoch `epoch` starts from them: PrC from epoch 1 on and one SnC snapshot per earlier epoch but
        the first. Saved banks may hold more (an attempt that got further, then was killed); this epoch's snapshot
        is encoded again."""
        load_banks({k: b for k, b in banks.items() if file_problem(self.banks / f"{k}.safetensors") is None},
                   self.banks)
        for key, count in (("prc", int(epoch > 0)), ("snc", max(epoch - 1, 0))):
            if key in banks:
                banks[key].n_reps = min(banks[key].n_reps, count)

    def save_snapshot(self, banks, name: str) -> None:
        save_banks({name: banks[name]}, self.banks)  # rank 0 writes
        crash_point("bank_encoded")

    def save_epoch(self, rows: list[dict]) -> None:
        if self.writes:
            append_metrics(self.folder, rows)  # replaces the rows of an epoch evaluated before a crash
        crash_point("epoch_evaluated")

    def save_result(self, model, tokenizer, notes: list[str], unit_masks: dict | None = None) -> None:
        """The run's model (scores folded) as a standard checkpoint, `model/`, then a compact one, `sparse/`, or,
        given the `unit_masks` of a structured run, those masks and the model without the units they remove,
        `export/`; `notes` (how the run went off its schedule) on the last epoch's metrics rows. Each folder gets
        its model card."""
        if not self.writes:
            return
        if notes:
            self._record_warnings(notes)
        rows = [r for r in self.rows() if r.get("stage") == self.rows()[-1].get("stage")] if self.rows() else []
        tmp = self.folder / "model.tmp"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_card(tmp, self.card, rows)
        publish_dir(tmp, self.folder / "model")
        crash_point("model_published")
        if unit_masks is None:
            save_sparse(model, self.folder / "sparse.tmp", tokenizer=tokenizer)
            write_card(self.folder / "sparse.tmp", self.card, rows, kind="sparse")
            publish_dir(self.folder / "sparse.tmp", self.last)
        else:
            save_tensors_atomic(unit_masks, self.folder / "masks.safetensors")
            export_pruned(model, unit_masks["head_mask"], unit_masks["ffn_mask"], self.last, tokenizer=tokenizer,
                          card=(self.card, rows))
        self.drop_checkpoints()

    def _record_warnings(self, notes: list[str]) -> None:
        """Put `notes` on the metrics.json rows of the last evaluated epoch (`warnings`): the results say how a run
        went wrong, not only the log."""
        rows = self.rows()
        if not rows:
            return
        for row in rows:
            if row.get("stage") == rows[-1].get("stage"):
                row["warnings"] = notes
        write_json_atomic(self.folder / "metrics.json", rows)
