"""What every recipe needs: the task's data, the student and teacher, the pruning recipes' CAPTrainer (the
TrainingArguments and metrics rows every part reads are in `cap.methods`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import DataCollatorWithPadding, TrainingArguments

from cap.data import TaskData, get_task, load_task_data
from cap.distributed import main_first
from cap.errors import UserError
from cap.models import build_model, load_teacher, load_tokenizer
from cap.trainer import CAPTrainer, Contrast, LossWeights


@dataclass
class Setup:
    data: TaskData
    tokenizer: object
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    collator: DataCollatorWithPadding


def prepare(cfg: DictConfig, *, teacher_path: str | None = None) -> Setup:
    """Load and check everything a run needs, before anything is trained or written. Config values were checked
    by `cap.checks.validate`; here the data (file and line of a bad row) and whether the teacher fits."""
    transformers.set_seed(cfg.seed)
    spec = get_task(cfg.task.name)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    eval_split = cfg.data.eval_split
    with main_first():  # the main process tokenises into the cache, the others load it from there
        data = load_task_data(
            spec.name, tokenizer, data_dir=cfg.data.dir, train_split=cfg.data.train_split,
            eval_splits=OmegaConf.to_object(eval_split) if OmegaConf.is_config(eval_split) else eval_split,
            max_seq_length=cfg.data.max_seq_length, max_train_samples=cfg.data.max_train_samples,
            max_eval_samples=cfg.data.max_eval_samples, seed=cfg.data.seed, doc_stride=cfg.data.doc_stride,
            max_query_length=cfg.data.max_query_length, cache_dir=cfg.data.cache_dir,
            validation_from_train=cfg.data.validation_from_train,
        )
    model = build_model(cfg.model.name_or_path, spec)
    teacher_path = teacher_path or cfg.teacher.path
    teacher = None
    if teacher_path:
        teacher = load_teacher(teacher_path, spec, model)
        fic = cfg.method.name != "finetune" and cfg.contrast.enabled and cfg.contrast.fic
        if fic and teacher.config.hidden_size != model.config.hidden_size:
            raise UserError(f"teacher.path={teacher_path} has hidden size {teacher.config.hidden_size}, the student "
                            f"{model.config.hidden_size}: the FiC bank sets teacher vectors against the student's, "
                            "so both need one width; use a teacher fine-tuned from model.name_or_path, or "
                            "contrast.fic=false")
    elif cfg.kd.weight > 0:
        raise UserError("kd.weight > 0 needs teacher.path=<a checkpoint fine-tuned on this task>")
    return Setup(data, tokenizer, model, teacher, DataCollatorWithPadding(tokenizer))


def loss_weights(cfg: DictConfig) -> LossWeights:
    return LossWeights(ce=cfg.ce.weight, kd=cfg.kd.weight, kd_temperature=cfg.kd.temperature)


def contrast_settings(cfg: DictConfig) -> Contrast:
    c = cfg.contrast
    return Contrast(temperature=c.temperature, unsup_weight=c.unsup_weight, sup_weight=c.sup_weight,
                    extra_examples=c.extra_examples, normalization=c.normalization, pooling=c.pooling,
                    reaches=c.reaches)


def pruning_trainer(cfg: DictConfig, setup: Setup, args: TrainingArguments, banks: dict,
                    **kwargs) -> CAPTrainer:
    """A CAPTrainer for a pruning recipe: CAP's loss (spec §3) with the config's weights and contrastive settings on
    `banks`, its extras drawn per rank and micro-batch (Q4, `CAPTrainer`); `kwargs` go to the Trainer."""
    return CAPTrainer(model=setup.model, args=args, train_dataset=setup.data.train, data_collator=setup.collator,
                      processing_class=setup.tokenizer, weights=loss_weights(cfg), teacher=setup.teacher,
                      banks=banks, contrast=contrast_settings(cfg), draw_seed=cfg.seed,
                      **kwargs)
