import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, TrainerCallback, TrainingArguments

from cap.trainer import CAPTrainer, LossWeights


def _toy_dataset(n=32, seq=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, seq), generator=g)
    ids[:, 0] = 101
    return Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n,
        "labels": (ids[:, 1] % 2).tolist(), "idx": list(range(n)),
    })


def _trainer(tiny_model_dir, tmp_path, weights, teacher=None, logged=None):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                             logging_steps=2, report_to=[], remove_unused_columns=False, save_strategy="no",
                             learning_rate=1e-3, disable_tqdm=True)
    trainer = CAPTrainer(model=model, args=args, train_dataset=_toy_dataset(), weights=weights, teacher=teacher,
                         )
    if logged is not None:
        class Capture(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                logged.append(dict(logs))
        trainer.add_callback(Capture())
    return trainer


def test_loss_combines_weighted_terms_and_logs_each(tiny_model_dir, tmp_path):
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    weights = LossWeights(ce=0.1, kd=0.9, kd_temperature=2.0)
    logged = []
    trainer = _trainer(tiny_model_dir, tmp_path, weights, teacher=teacher, logged=logged)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    terms, _ = trainer.loss_terms(trainer.model, batch)
    assert set(terms) == {"ce", "kd"}
    loss = trainer.compute_loss(trainer.model, batch)
    # compute_loss runs with dropout; compare against the weighted sum in eval mode instead
    trainer.model.eval()
    assert set(trainer.loss_terms(trainer.model, batch)[0]) == {"ce"}  # evaluation does not run the teacher
    terms, _ = trainer.loss_terms(trainer.model, batch, contrast=False)  # as CAP-f's importance pass asks
    assert torch.allclose(trainer.weighted(terms), 0.1 * terms["ce"] + 0.9 * terms["kd"])
    assert loss.requires_grad
    trainer.train()
    train_logs = [r for r in logged if "loss" in r]
    assert train_logs and all("loss_ce" in r and "loss_kd" in r for r in train_logs)
    assert all(p.grad is None for p in trainer.teacher.parameters())  # the teacher never learns


def test_kd_without_teacher_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        _trainer(tiny_model_dir, tmp_path, LossWeights(ce=0.1, kd=0.9))


def test_teacher_cache_is_shared_across_seeds_only_when_pinned():
    from helpers import composed

    from cap.recipes.finetune import teacher_run

    def folder(*overrides):
        return teacher_run(composed(["method=cap_f", *overrides]))[0]

    assert folder("seed=1") != folder("seed=2")  # by default the teacher and the subsample follow `seed`
    pinned = ("teacher.seed=0", "data.seed=0", "data.max_train_samples=100")
    assert folder("seed=1", *pinned) == folder("seed=2", *pinned)
    assert folder("seed=1", *pinned) != folder("seed=1", *pinned, "teacher.lr=1e-4")
    assert teacher_run(composed(["method=cap_f", "seed=3", "teacher.seed=0"]))[1].seed == 0
