"""data.group_by_length: training batches of similar length from the Trainer's length-grouped sampler, seeded per
epoch (the same on every rank, again on resume); evaluation and bank encoding sorted by length, their outputs put
back in dataset order."""
import numpy as np
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset
from torch.utils.data import BatchSampler
from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, TrainerCallback,
                          TrainingArguments)

from cap.banks import encode_vectors
from cap.evaluation import predict_by_length
from cap.trainer import CAPTrainer, EpochSeededLengthGroupedSampler, LossWeights


def _dataset(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=g).tolist()
    ids = [[101] + torch.randint(1000, 2000, (k - 2,), generator=g).tolist() + [102] for k in lengths]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                              "labels": [x[1] % 2 for x in ids], "idx": list(range(n))})


def _order(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_the_order_is_seeded_per_epoch_and_the_same_on_every_rank():
    lengths = [len(x) for x in _dataset()["input_ids"]]
    ranks = []
    for rank in range(2):  # two processes: their global RNGs have moved differently (dropout on other shapes)
        torch.manual_seed(100 + rank)
        torch.rand(1000 * (rank + 1))
        ranks.append(EpochSeededLengthGroupedSampler(4, lengths, seed=7))
    assert _order(ranks[0], 0) == _order(ranks[1], 0)
    assert _order(ranks[0], 1) == _order(ranks[1], 1) != _order(ranks[0], 0)
    assert _order(ranks[0], 0) == _order(EpochSeededLengthGroupedSampler(4, lengths, seed=7), 0)  # reproducible
    assert _order(ranks[0], 0) != _order(EpochSeededLengthGroupedSampler(4, lengths, seed=8), 0)
    # Accelerate deals the batches out to the ranks: together they see every example once per epoch
    ranks[0].set_epoch(3)
    ranks[1].set_epoch(3)
    shards = [list(BatchSamplerShard(BatchSampler(s, 4, False), num_processes=2, process_index=r))
              for r, s in enumerate(ranks)]
    seen = sorted(i for shard in shards for batch in shard for i in batch)
    assert seen == list(range(len(lengths)))


def test_grouped_batches_waste_little_padding():
    lengths = [len(x) for x in _dataset(400)["input_ids"]]
    order = _order(EpochSeededLengthGroupedSampler(8, lengths, seed=0), 0)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    grouped = sum(8 * max(lengths[i] for i in b) for b in batches)
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random = sum(8 * max(lengths[i] for i in perm[k:k + 8]) for k in range(0, len(perm), 8))
    assert sorted(order) == list(range(len(lengths)))
    assert grouped < 0.75 * random  # near sum(lengths); random batches pad to their longest


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step  # after this update's checkpoint


def _trainer(tiny_model_dir, tokenizer, tmp_path, callbacks=(), **kwargs):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[],
                             remove_unused_columns=False, learning_rate=1e-3, disable_tqdm=True, use_cpu=True,
                             train_sampling_strategy="group_by_length", seed=3, **kwargs)
    trainer = CAPTrainer(model=model, args=args, train_dataset=_dataset(96),
                         data_collator=DataCollatorWithPadding(tokenizer), weights=LossWeights(ce=1.0),
                         callbacks=list(callbacks))
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **k):
        if model.training:
            seen.append(inputs["idx"].tolist())
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = recording
    return trainer, seen


def test_a_run_resumed_mid_epoch_trains_on_the_batches_of_an_uninterrupted_one(tiny_model_dir, tokenizer, tmp_path):
    # 96 examples, batch 4: 24 updates an epoch; a checkpoint every 16 updates, so the second one is mid-epoch 2
    reference, ref_batches = _trainer(tiny_model_dir, tokenizer, tmp_path / "ref", num_train_epochs=2,
                                      save_strategy="no")
    assert isinstance(reference._get_train_sampler(), EpochSeededLengthGroupedSampler)
    reference.train()
    killed, _ = _trainer(tiny_model_dir, tokenizer, tmp_path / "run", [StopAt(32)], num_train_epochs=2,
                         save_strategy="steps", save_steps=16)
    killed.train()  # as if killed after update 32, with checkpoint-32 written
    resumed, batches = _trainer(tiny_model_dir, tokenizer, tmp_path / "run", num_train_epochs=2,
                                save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-32"))
    assert batches == ref_batches[32:]
    assert ref_batches[:24] != ref_batches[24:]  # each epoch its own order
    lengths = [len(x) for x in _dataset(96)["input_ids"]]
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in ref_batches]
    assert np.mean(spread) < 5  # batches of similar length (lengths span 3..29)
    for (name, p), q in zip(reference.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_sorted_evaluation_and_encoding_give_dataset_order_outputs(tiny_model_dir, tokenizer, tmp_path):
    data = _dataset(40)
    collator = DataCollatorWithPadding(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    plain = encode_vectors(model, data, collator, batch_size=8)
    by_length = encode_vectors(model, data, collator, batch_size=8, sort_by_length=True)
    assert torch.allclose(plain, by_length, atol=1e-5)
    outputs = {}
    for strategy in ("random", "group_by_length"):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[],
                                 remove_unused_columns=False, use_cpu=True, train_sampling_strategy=strategy)
        trainer = CAPTrainer(model=model, args=args, data_collator=collator, weights=LossWeights(ce=1.0))
        outputs[strategy] = predict_by_length(trainer, data.remove_columns("idx"))
    assert np.allclose(outputs["random"].predictions, outputs["group_by_length"].predictions, atol=1e-5)
    assert np.array_equal(outputs["group_by_length"].label_ids, np.asarray(data["labels"]))
