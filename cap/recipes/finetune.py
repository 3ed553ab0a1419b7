"""Fine-tune a dense model on a task: the dense reference, and the teacher of CAP runs (KD, the FiC bank of spec
§4), fine-tuned once and cached for later runs (`ensure_teacher`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cap import tracking
from cap.distributed import barrier, broadcast, job_lock, this_process
from cap.evaluation import evaluate_task
from cap.io import publish_dir, read_json, write_json_atomic
from cap.model_card import write_card
from cap.precision import resolve_config
from cap.recipes import summary
from cap.methods import metric_rows, training_arguments
from cap.recipes.common import loss_weights, prepare
from cap.stages import Stage, StageSettings, already_finished
from cap.trainer import CAPTrainer

DONE = "DONE"


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    model_dir, stage = run_dir / "model", Stage(run_dir, StageSettings.from_config(cfg))
    if cfg.trainer.resume and (model_dir / DONE).exists():
        print(already_finished(run_dir))
        stage.drop_checkpoints()  # what a kill during the deletion left
        return read_json(run_dir / "metrics.json", [])
    setup, tracked = prepare(cfg), tracking.TrackingSettings.from_config(cfg)
    last = stage.checkpoint()
    args = training_arguments(cfg, stage.checkpoints, tracking.start(tracked, run_dir))
    trainer = CAPTrainer(
        model=setup.model, args=args, train_dataset=setup.data.train, data_collator=setup.collator,
        processing_class=setup.tokenizer, weights=loss_weights(cfg), teacher=setup.teacher,
        callbacks=tracking.callbacks(args.report_to, run_dir),
    )
    if last:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)

    results = evaluate_task(trainer, setup.data, out_dir=run_dir if stage.writes else None)
    rows = metric_rows(results, stage="final", method="finetune", sparsity=0.0, step=trainer.state.global_step)
    tmp = run_dir / "model.tmp"
    trainer.save_model(str(tmp))  # the main process writes (the Trainer's rule, as ours)
    if stage.writes:
        write_card(tmp, stage.card, rows)
        write_json_atomic(run_dir / "metrics.json", rows)  # a resumed run rewrites its single final row
        tracking.log_summary({f"{r['split']}/{k}": v for r in rows for k, v in r.items() if isinstance(v, float)})
        (tmp / DONE).touch()
        publish_dir(tmp, model_dir)
    barrier()  # the others read the model once it is in place
    stage.drop_checkpoints()  # the run is finished once model/DONE is in place
    tracking.log_models(tracked, run_dir)  # logger.log_model=true; the main process (the one W&B runs in)
    tracking.finish()
    return rows


def teacher_run(cfg: DictConfig) -> tuple[Path, DictConfig]:
    """Where the teacher of `cfg` is cached, and the finetune config that trains it. The folder name is a hash of
    everything that changes what the teacher learns, so runs that differ only in `seed` share one teacher when
    `teacher.seed` and `data.seed` are pinned."""
    teacher_cfg = OmegaConf.merge(cfg, {
        "seed": cfg.teacher.seed, "method": {"name": "finetune"}, "ce": {"weight": 1.0}, "kd": {"weight": 0.0},
        "contrast": {"enabled": False}, "trainer": {"epochs": cfg.teacher.epochs, "lr": cfg.teacher.lr,
                                                     "max_steps": -1, "resume": True},
    })
    resolve_config(teacher_cfg)  # the precision it trains in is part of what it learns
    settings = {"task": cfg.task.name, "model": cfg.model.name_or_path, "seed": teacher_cfg.seed,
                "epochs": cfg.teacher.epochs, "lr": cfg.teacher.lr, "batch_size": teacher_cfg.trainer.batch_size,
                "data": OmegaConf.to_container(teacher_cfg.data, resolve=True)}
    # keys added later: at the values that computed as before, they keep the older caches' keys
    if settings["data"]["validation_from_train"] is None:
        del settings["data"]["validation_from_train"]
    if not settings["data"]["group_by_length"]:
        del settings["data"]["group_by_length"]
    if teacher_cfg.trainer.precision != "fp32":
        settings["precision"] = teacher_cfg.trainer.precision
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg.teacher.cache_dir) / f"{cfg.task.name}-{key}", teacher_cfg


def ensure_teacher(cfg: DictConfig) -> str:
    """`teacher.path`, or a teacher fine-tuned now and cached under `teacher.cache_dir` for later runs. Jobs that
    need the same teacher take turns under a lock: the first fine-tunes it (all of its processes together), the
    others wait and reuse it; a job killed while fine-tuning leaves a resumable run behind, not a held lock."""
    if cfg.teacher.path:
        return cfg.teacher.path
    teacher_dir, teacher_cfg = teacher_run(cfg)
    done = teacher_dir / "model" / DONE
    if not broadcast(done.exists()):
        if this_process().main:
            teacher_dir.parent.mkdir(parents=True, exist_ok=True)
        barrier()
        with job_lock(teacher_dir.with_name(f".{teacher_dir.name}.lock"), f"fine-tuning the teacher {teacher_dir}"):
            if not broadcast(done.exists()):  # the job that held the lock may have fine-tuned it
                if this_process().main:
                    print(f"no teacher.path given: fine-tuning a teacher into {teacher_dir} (cached for later runs)")
                    teacher_dir.mkdir(parents=True, exist_ok=True)
                barrier()
                rows = run(teacher_cfg, teacher_dir)
                if this_process().main:
                    print("teacher " + summary(teacher_dir, rows, "finetune"))
    return str(teacher_dir / "model")
