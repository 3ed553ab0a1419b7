"""Fine-tune a dense model on a task: the teacher of CAP runs (KD, FiC bank), and the dense reference."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cap import tracking
from cap.evaluation import evaluate_task
from cap.io import (last_complete_checkpoint, process_rank, publish_dir, read_json, remove_checkpoints,
                    write_json_atomic)
from cap.recipes.common import loss_weights, metric_rows, prepare, training_arguments
from cap.trainer import CAPTrainer

DONE = "DONE"


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    model_dir, ckpt_dir = run_dir / "model", run_dir / "checkpoints"
    delete_checkpoints = process_rank() == 0 and not cfg.trainer.keep_checkpoints
    if cfg.trainer.resume and (model_dir / DONE).exists():
        print(f"already finished: {run_dir} (trainer.resume=false starts over)")
        if delete_checkpoints:
            remove_checkpoints(ckpt_dir)  # what a kill during the deletion left
        return read_json(run_dir / "metrics.json", [])
    setup = prepare(cfg)
    last = last_complete_checkpoint(ckpt_dir) if cfg.trainer.resume else None
    trainer = CAPTrainer(
        model=setup.model, args=training_arguments(cfg, ckpt_dir, tracking.start(cfg, run_dir)),
        train_dataset=setup.data.train, data_collator=setup.collator, processing_class=setup.tokenizer,
        weights=loss_weights(cfg), teacher=setup.teacher,
    )
    if last:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)

    results = evaluate_task(trainer, setup.data, out_dir=run_dir)
    rows = metric_rows(results, stage="final", method="finetune", sparsity=0.0, step=trainer.state.global_step)
    write_json_atomic(run_dir / "metrics.json", rows)  # a resumed run rewrites its single final row
    tracking.log_summary({f"{r['split']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, float)})

    tmp = run_dir / "model.tmp"
    trainer.save_model(str(tmp))
    (tmp / DONE).touch()
    publish_dir(tmp, model_dir)
    if delete_checkpoints:  # the run is finished once model/DONE is in place
        remove_checkpoints(ckpt_dir)
    tracking.finish()
    return rows
