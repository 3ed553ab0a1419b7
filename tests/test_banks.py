"""Bank encoding: dataset order, eval mode, one process vs two (gloo) give the same bank; CAP training with all
three banks lowers the contrastive terms."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          DataCollatorWithPadding, TrainerCallback, TrainingArguments)

from cap.banks import encode_into, encode_vectors
from cap.contrastive import RepresentationBank
from cap.trainer import CAPTrainer, Contrast, LossWeights


def toy_dataset(n=40, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (n, seq), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(4, seq + 1, (n,), generator=g)
    input_ids = [row[:k].tolist() for row, k in zip(ids, lengths)]
    return Dataset.from_dict({
        "input_ids": input_ids, "attention_mask": [[1] * len(r) for r in input_ids],
        "labels": (ids[:, 1] % 2).tolist(), "idx": list(range(n)),
    })


def tiny_classifier(path, seed=0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def test_encoding_is_in_dataset_order_normalised_and_in_eval_mode(tiny_model_dir, tokenizer):
    model = tiny_classifier(tiny_model_dir).train()
    data = toy_dataset()
    collator = DataCollatorWithPadding(tokenizer)
    whole = encode_vectors(model, data, collator, batch_size=7)
    assert model.training  # mode restored
    assert whole.shape == (40, 32)
    assert torch.allclose(whole.norm(dim=-1), torch.ones(40), atol=1e-5)
    one_by_one = torch.cat([encode_vectors(model, data.select([i]), collator) for i in (5, 17)])
    assert torch.allclose(whole[[5, 17]], one_by_one, atol=1e-5)  # padding and batching change nothing
    model.eval()
    with torch.no_grad():
        pooled = model.bert(input_ids=torch.tensor([data[3]["input_ids"]])).pooler_output
    assert torch.allclose(whole[3], torch.nn.functional.normalize(pooled, dim=-1)[0], atol=1e-5)


def _encode_worker(rank, world, model_dir, tokenizer_dir, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["CAP_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import AutoTokenizer

    model = tiny_classifier(model_dir)
    bank = RepresentationBank(40, 32, max_reps=1)
    encode_into(bank, model, toy_dataset(), DataCollatorWithPadding(AutoTokenizer.from_pretrained(tokenizer_dir)),
                batch_size=6)
    torch.save(bank.view().clone(), f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_build_the_same_bank_as_one(tiny_model_dir, tokenizer, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["CAP_TEST_PORT"] = str(s.getsockname()[1])
    out = tmp_path / "bank"
    mp.spawn(_encode_worker, args=(2, str(tiny_model_dir), str(tiny_model_dir), str(out)), nprocs=2)
    single = RepresentationBank(40, 32, max_reps=1)
    encode_into(single, tiny_classifier(tiny_model_dir), toy_dataset(), DataCollatorWithPadding(tokenizer))
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0, rank1)
    assert torch.allclose(rank0.float(), single.view().float(), atol=1e-3)


def diverse_classifier(seed):
    """A tiny BERT whose sentence vectors differ between inputs (at the default init they are all alike)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, initializer_range=0.2, num_labels=2)
    return BertForSequenceClassification(config)


def test_training_with_three_banks_lowers_the_contrastive_terms(tokenizer, tmp_path):
    data, collator = toy_dataset(n=48), DataCollatorWithPadding(tokenizer)
    student, teacher = diverse_classifier(0), diverse_classifier(1)
    labels = torch.tensor(data["labels"])
    banks = {name: RepresentationBank(48, 32, max_reps=r, labels=labels) for name, r in
             (("prc", 1), ("fic", 1), ("snc", 2))}
    encode_into(banks["prc"], student, data, collator)
    encode_into(banks["fic"], teacher, data, collator)
    encode_into(banks["snc"], student, data, collator)
    encode_into(banks["snc"], teacher, data, collator)
    logged = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                logged.append(logs)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=60,
                             learning_rate=1e-3, logging_steps=10, report_to=[], remove_unused_columns=False,
                             save_strategy="no", disable_tqdm=True, seed=0)
    trainer = CAPTrainer(model=student, args=args, train_dataset=data, data_collator=collator,
                         weights=LossWeights(ce=0.1), banks=banks,
                         contrast=Contrast(temperature=0.1, unsup_weight=1.0, sup_weight=1.0, extra_examples=16),
                         callbacks=[Capture()])
    trainer.train()
    def total(row):
        return row["loss_prc"] + row["loss_fic"] + row["loss_snc"]

    assert total(logged[-1]) < total(logged[0]) - 0.3, [total(r) for r in logged]
    # the student starts as the pre-trained model itself, so PrC starts near its optimum; the others must fall
    for term in ("loss_fic", "loss_snc"):
        assert logged[-1][term] < logged[0][term], (term, [r[term] for r in logged])


def test_the_gradient_balance_is_logged_and_changes_no_update(tokenizer, tmp_path):
    """grad_norm_task / grad_norm_contrast / grad_cosine at every logging step; the weights trained are the same
    to the bit as when nothing is logged (autograd.grad leaves .grad and the RNG alone)."""
    data, collator = toy_dataset(n=32), DataCollatorWithPadding(tokenizer)
    labels = torch.tensor(data["labels"])

    def train(logging_steps):
        student = diverse_classifier(0)
        bank = RepresentationBank(32, 32, max_reps=1, labels=labels)
        encode_into(bank, diverse_classifier(1), data, collator)
        logged = []

        class Capture(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                logged.append(dict(logs))

        args = TrainingArguments(output_dir=str(tmp_path / str(logging_steps)), per_device_train_batch_size=8,
                                 max_steps=4, learning_rate=1e-3, logging_steps=logging_steps, report_to=[],
                                 remove_unused_columns=False, save_strategy="no", disable_tqdm=True, seed=0)
        CAPTrainer(model=student, args=args, train_dataset=data, data_collator=collator,
                   weights=LossWeights(ce=0.1), banks={"fic": bank},
                   contrast=Contrast(unsup_weight=1.0, sup_weight=1.0, extra_examples=8),
                   callbacks=[Capture()]).train()
        return student, [r for r in logged if "loss" in r]

    every, logs = train(logging_steps=2)
    never, _ = train(logging_steps=100)
    assert len(logs) == 2 and all(r["grad_norm_task"] > 0 and r["grad_norm_contrast"] > 0 for r in logs)
    assert all(-1 <= r["grad_cosine"] <= 1 for r in logs)
    assert all(torch.equal(a, b) for a, b in zip(every.state_dict().values(), never.state_dict().values()))


@pytest.mark.parametrize("reaches", ["both", "weights", "scores"])
def test_contrast_reaches_only_the_part_asked_for(tokenizer, tmp_path, reaches):
    """contrast.reaches: with the contrastive terms the only loss, the movement scores move iff they are reached,
    and so do the encoder's weights (AdamW without decay leaves a parameter with zero gradient where it was)."""
    from cap.pruning.movement import MovementScores

    data, collator = toy_dataset(n=16), DataCollatorWithPadding(tokenizer)
    student = diverse_classifier(0)
    MovementScores.attach(student, "topk").set_level(1.0)
    bank = RepresentationBank(16, 32, max_reps=1, labels=torch.tensor(data["labels"]))
    encode_into(bank, diverse_classifier(1), data, collator)
    before = {n: p.detach().clone() for n, p in student.bert.encoder.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                             learning_rate=1e-2, weight_decay=0.0, report_to=[], remove_unused_columns=False,
                             save_strategy="no", disable_tqdm=True, seed=0)
    CAPTrainer(model=student, args=args, train_dataset=data, data_collator=collator, weights=LossWeights(ce=0.0),
               banks={"fic": bank}, contrast=Contrast(unsup_weight=1.0, sup_weight=1.0, extra_examples=8,
                                                      reaches=reaches)).train()
    moved = {n for n, p in student.bert.encoder.named_parameters() if not torch.equal(p, before[n])}
    assert any("scores" in n for n in moved) == (reaches != "weights")
    assert any("scores" not in n for n in moved) == (reaches != "scores")


def test_gradient_balance_is_the_norms_and_cosine_of_the_two_gradients():
    from cap.losses import gradient_balance

    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 2.0, 0.0])
    out = gradient_balance((p * a).sum(), (p * (a + b)).sum(), [p])
    assert out["grad_norm_task"] == pytest.approx(5.0) and out["grad_norm_contrast"] == pytest.approx(29 ** 0.5)
    assert out["grad_cosine"] == pytest.approx(25 / (5 * 29 ** 0.5)) and p.grad is None
    still = gradient_balance((p * a).sum(), torch.tensor(0.0), [p])  # a term with no graph (its weights are 0)
    assert (still["grad_norm_contrast"], still["grad_cosine"]) == (0.0, 0.0)


def test_gradient_balance_splits_into_parts_from_the_same_gradients():
    """`parts`: the figures for a subset of the parameters (a movement run's scores and weights apart)."""
    from cap.losses import gradient_balance

    w, s = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    task, contrast = (w * torch.tensor([3.0, 4.0])).sum() + 2 * s.sum(), (w * torch.tensor([4.0, -3.0])).sum() - s.sum()
    out = gradient_balance(task, contrast, [w, s], parts={"weights": [True, False], "scores": [False, True]})
    assert out["grad_norm_task_weights"] == pytest.approx(5.0) and out["grad_cosine_weights"] == pytest.approx(0.0)
    assert out["grad_norm_contrast_scores"] == pytest.approx(1.0) and out["grad_cosine_scores"] == pytest.approx(-1.0)
    assert out["grad_norm_task"] == pytest.approx(29 ** 0.5)  # the whole is unchanged
    assert "grad_norm_task_none" not in gradient_balance(task, contrast, [w, s], parts={"none": [False, False]})


def test_fixed_extra_ids_replace_the_draws(tokenizer, tmp_path):
    from cap.contrastive import contrastive_loss

    data, collator = toy_dataset(n=32), DataCollatorWithPadding(tokenizer)
    bank = RepresentationBank(32, 32, max_reps=1, labels=torch.tensor(data["labels"]))
    encode_into(bank, diverse_classifier(1), data, collator)
    fixed = torch.tensor([3, 17, 29])

    def terms(draw_seed, fixed_extra_idx):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], remove_unused_columns=False, seed=0)
        trainer = CAPTrainer(model=diverse_classifier(0), args=args, weights=LossWeights(ce=0.1),
                             banks={"fic": bank}, contrast=Contrast(extra_examples=8), draw_seed=draw_seed,
                             fixed_extra_idx=fixed_extra_idx)
        trainer.model.eval()  # no dropout: the same representation in every call
        batch = collator([data[i] for i in range(8)])
        with torch.no_grad():
            value = trainer.loss_terms(trainer.model, batch, contrast=True)[0]["fic"]
            rep = trainer.tap.representation(batch["attention_mask"])
        return value, rep, batch

    a, rep, batch = terms(1, {"fic": fixed})
    assert torch.equal(a, terms(2, {"fic": fixed})[0])  # the draw seed no longer matters
    assert not torch.equal(terms(1, None)[0], terms(2, None)[0])  # ... as it does with draws
    c = Contrast(extra_examples=8)
    expected = contrastive_loss(rep, bank.view(), batch["idx"], fixed, temperature=c.temperature,
                                unsup_weight=c.unsup_weight, sup_weight=c.sup_weight, labels=batch["labels"],
                                bank_labels=bank.labels, normalization=c.normalization)
    assert torch.allclose(a, expected)
