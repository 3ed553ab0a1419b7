"""cap.pruning.structured on tiny BertConfig models: hooks equal weight surgery, importance, schedule, selection."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification

from cap.pruning import (
    Packing,
    StructuredMasks,
    compute_importance,
    normalize_by_layer,
    pruning_targets,
    select_heads,
    select_neurons,
)

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 4, 64
HEAD_DIM = HIDDEN // HEADS


def tiny(cls, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=64, num_labels=2, initializer_range=0.2)
    return cls(config).eval()


def batch(seed=1, size=3, length=10):
    generator = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(size, length, dtype=torch.long)
    attention_mask[0, 7:] = 0
    return {"input_ids": torch.randint(1, 100, (size, length), generator=generator),
            "attention_mask": attention_mask,
            "labels": torch.randint(0, 2, (size,), generator=generator)}


def logits(model, inputs):
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return torch.cat([out.start_logits, out.end_logits], -1) if hasattr(out, "start_logits") else out.logits


def ce_loss(model, inputs):
    return F.cross_entropy(model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits,
                           inputs["labels"])


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_all_ones_masks_leave_outputs_unchanged(cls):
    model, inputs = tiny(cls), batch()
    reference = logits(model, inputs)
    masks = StructuredMasks.from_model(model).apply(model)
    assert masks.head_mask.shape == (LAYERS, HEADS) and masks.ffn_mask.shape == (LAYERS, FFN)
    assert torch.equal(logits(model, inputs), reference)


def test_head_mask_equals_zeroing_value_slice():
    model, inputs = tiny(BertForSequenceClassification), batch()
    stock = logits(model, inputs)
    edited = copy.deepcopy(model)
    value = edited.bert.encoder.layer[1].attention.self.value
    head = slice(2 * HEAD_DIM, 3 * HEAD_DIM)
    with torch.no_grad():
        value.weight[head] = 0
        value.bias[head] = 0
    masks = StructuredMasks.from_model(model).apply(model)
    masks.head_mask[1, 2] = 0
    masked = logits(model, inputs)
    assert not torch.allclose(masked, stock, atol=1e-4)
    torch.testing.assert_close(masked, logits(edited, inputs), atol=1e-5, rtol=0)
    masks.remove()
    assert torch.equal(logits(model, inputs), stock)


def test_ffn_mask_equals_zeroing_intermediate_row():
    model, inputs = tiny(BertForQuestionAnswering), batch()
    stock = logits(model, inputs)
    edited = copy.deepcopy(model)
    dense = edited.bert.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        dense.weight[[5, 40]] = 0
        dense.bias[[5, 40]] = 0
    masks = StructuredMasks.from_model(model).apply(model)
    masks.ffn_mask[0, [5, 40]] = 0
    masked = logits(model, inputs)
    assert not torch.allclose(masked, stock, atol=1e-4)
    torch.testing.assert_close(masked, logits(edited, inputs), atol=1e-5, rtol=0)
    masks.remove()
    assert torch.equal(logits(model, inputs), stock)


def test_importance_is_zero_for_units_that_cannot_change_the_loss():
    model = tiny(BertForSequenceClassification)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, HEAD_DIM:2 * HEAD_DIM] = 0  # head (0, 1)
        model.bert.encoder.layer[1].output.dense.weight[:, 7] = 0  # neuron (1, 7)
    model.train()
    masks = StructuredMasks.from_model(model).apply(model)
    batches = [batch(seed=1), batch(seed=2)]
    head_importance, ffn_importance = compute_importance(model, masks, batches, ce_loss)

    assert head_importance.dtype == ffn_importance.dtype == torch.float32
    assert head_importance[0, 1] == 0 and ffn_importance[1, 7] == 0
    others = torch.ones_like(head_importance, dtype=torch.bool)
    others[0, 1] = False
    assert (head_importance[others] > 0).all()
    others = torch.ones_like(ffn_importance, dtype=torch.bool)
    others[1, 7] = False
    assert (ffn_importance[others] > 0).all()

    # Σ_batches |∂L/∂m|, each batch taken alone (not |Σ ∂L/∂m|), in eval mode
    model.eval()
    masks.track_gradients(True)
    expected = [torch.zeros_like(head_importance), torch.zeros_like(ffn_importance)]
    for inputs in batches:
        grads = torch.autograd.grad(ce_loss(model, inputs), [masks.head_mask, masks.ffn_mask])
        expected = [e + g.abs() for e, g in zip(expected, grads)]
    masks.track_gradients(False)
    torch.testing.assert_close(head_importance, expected[0])
    torch.testing.assert_close(ffn_importance, expected[1])

    # the pass restores the model: train mode, trainable parameters, no gradients left behind
    model.train()
    compute_importance(model, masks, batches[:1], ce_loss, desc="importance")
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not masks.head_mask.requires_grad and masks.head_mask.grad is None


def test_packed_importance_equals_batch_by_batch():
    """Packing runs the examples of several batches in forwards of similar length, each with its batch's copy of the
    masks: every batch still adds its own |∂L/∂m|, with a loss that couples a batch's examples (like CAP's in-batch
    contrastive peers)."""
    model = tiny(BertForSequenceClassification)
    generator = torch.Generator().manual_seed(3)
    batches = []
    for size, width in ((3, 10), (4, 6), (2, 12), (3, 8)):  # right-padded to their own widths
        lengths = torch.randint(2, width + 1, (size,), generator=generator)
        lengths[0] = width
        batches.append({"input_ids": torch.randint(1, 100, (size, width), generator=generator),
                        "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
                        "labels": torch.randint(0, 2, (size,), generator=generator)})
    masks = StructuredMasks.from_model(model)
    masks.head_mask[0, 1] = 0
    masks.ffn_mask[1, :9] = 0

    def coupled(logits, labels):  # CE plus a term over the batch's examples together
        return F.cross_entropy(logits, labels) + torch.logsumexp(logits[:, 0], 0)

    def forward(model, inputs):
        return {"logits": model(**inputs).logits}

    def loss_fn(model, inputs, outputs=None):
        if outputs is None:
            outputs = forward(model, {k: inputs[k] for k in ("input_ids", "attention_mask")})
        return coupled(outputs["logits"], inputs["labels"])

    expected = compute_importance(model, masks, batches, loss_fn)
    packing = Packing(forward, rows=3, tokens=60)  # chunks of 2-3 batches, forwards mixing them
    packed = compute_importance(model, masks, batches, loss_fn, packing=packing)
    for a, b in zip(packed, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # one copy of the masks for the chunk would give |Σ ∂L/∂m| instead: a different sum
    wrong = compute_importance(model, masks, batches[:1], lambda m, _: sum(loss_fn(m, b) for b in batches))
    assert not torch.allclose(wrong[0], expected[0])
    assert masks.example_groups is None and not masks.is_applied

    left_padded = dict(batches[1], attention_mask=batches[1]["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        compute_importance(model, masks, [left_padded], loss_fn, packing=packing)


def test_importance_applies_masks_temporarily():
    model, inputs = tiny(BertForSequenceClassification), batch()
    masks = StructuredMasks.from_model(model)
    masks.head_mask[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    head_importance, _ = compute_importance(model, masks, [inputs], ce_loss)
    assert (head_importance[1] > 0).all() and not masks.is_applied
    assert torch.equal(logits(model, inputs), logits(tiny(BertForSequenceClassification), inputs))


def test_normalize_by_layer():
    importance = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(normalize_by_layer(importance), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_select_heads_global_ranking_skips_pruned_and_keeps_one_per_layer():
    importance = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                               [0.05, 0.9, 0.8, 0.7]])
    mask = torch.ones(2, 4)
    mask[1, 0] = 0  # already pruned: skipped although it ranks lowest
    new = select_heads(importance, mask, 4)
    assert torch.equal(new, torch.tensor([[0.0, 0.0, 0.0, 1.0],
                                          [0.0, 1.0, 1.0, 0.0]]))
    assert torch.equal(mask[1], torch.tensor([0.0, 1.0, 1.0, 1.0]))  # input untouched
    last = select_heads(importance, new, 1)
    assert torch.equal(last.sum(dim=1), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="cannot prune 1 more heads"):
        select_heads(importance, last, 1)
    assert select_heads(importance, last, 1, min_heads_per_layer=0).sum() == 1


def test_legacy_head_floor_can_empty_a_layer(caplog):
    # spec Q10: layer 0's best-scoring head (0) is already masked; the original protects it anyway,
    # so head 3, the layer's last live head, becomes a candidate and goes first.
    importance = torch.tensor([[0.9, 0.2, 0.3, 0.01],
                               [0.5, 0.6, 0.7, 0.8]])
    mask = torch.tensor([[0.0, 0.0, 0.0, 1.0],
                         [1.0, 1.0, 1.0, 1.0]])
    fixed = select_heads(importance, mask, 1)
    assert torch.equal(fixed, torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]))
    with caplog.at_level(logging.WARNING, logger="cap.pruning.structured"):
        legacy = select_heads(importance, mask, 1, legacy_floor=True)
    assert torch.equal(legacy, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    assert "lost their last head" in caplog.text


def test_select_neurons_floor_and_errors():
    importance = torch.tensor([[0.1, 0.2, 0.3],
                               [0.4, 0.5, 0.6]])
    mask = torch.ones(2, 3)
    assert torch.equal(select_neurons(importance, mask, 3), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    floored = select_neurons(importance, mask, 3, min_per_layer=1)
    assert torch.equal(floored, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    assert torch.equal(select_neurons(importance, floored, 1), torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="cannot prune 5 more"):
        select_neurons(importance, mask, 5, min_per_layer=1)
    with pytest.raises(ValueError, match="shape"):
        select_neurons(importance[:1], mask, 1)


def test_pruning_targets_use_real_totals():
    sequence = [i / 10 for i in range(1, 10)]
    targets = pruning_targets(6 * 12, 6 * 1536, sequence)  # MiniLM: 72 heads, 9216 neurons (spec Q11)
    assert [h for h, _ in targets] == [7, 14, 21, 28, 36, 43, 50, 57, 64]
    assert [n for _, n in targets] == [921, 1843, 2764, 3686, 4608, 5529, 6451, 7372, 8294]
    base = pruning_targets(144, 36864, sequence)  # the original's BERT-base numbers (spec §5.1)
    assert [h for h, _ in base] == [14, 28, 43, 57, 72, 86, 100, 115, 129]
    assert base[-1][1] == 33177 and base[2][1] - base[1][1] == 3687
    assert pruning_targets(100, 100, [0.29]) == [(29, 29)]


@pytest.mark.parametrize("sequence", [[], [0.2, 0.1], [0.1, 0.1], [0.0, 0.5], [0.5, 1.0], [-0.1]])
def test_pruning_targets_reject_bad_sequences(sequence):
    with pytest.raises(ValueError, match="pruning sequence"):
        pruning_targets(72, 9216, sequence)


def test_sparsity_and_state_dict_round_trip():
    model = tiny(BertForSequenceClassification)
    masks = StructuredMasks.from_model(model)
    masks.head_mask[0, :2] = 0
    masks.ffn_mask[1, :16] = 0
    # per head: Q/K/V 3·(8·32 + 8) + O columns 32·8 = 1048; per neuron: 32 + 1 + 32 = 65;
    # encoder: 2 · (4·1056 + 2112 + 2080 + 2·64 LayerNorm) = 17088
    assert masks.sparsity() == {"heads": 2 / 8, "ffn_neurons": 16 / 128, "encoder_params": (2 * 1048 + 16 * 65) / 17088}

    restored = StructuredMasks.from_model(model).apply(model)
    restored.load_state_dict(masks.state_dict())
    assert torch.equal(restored.head_mask, masks.head_mask) and restored.sparsity() == masks.sparsity()
    with pytest.raises(RuntimeError, match="already applied"):
        restored.apply(model)
    with pytest.raises(ValueError, match="shape"):
        restored.load_state_dict({"head_mask": torch.ones(3, 4), "ffn_mask": torch.ones(2, 64)})


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_a_folded_model_loads_as_the_masked_model_and_unfolds_to_the_bit(cls, tmp_path):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    model, inputs = tiny(cls), batch()
    with torch.no_grad():  # biases start at 0: give them values, so that zeroing them is seen
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    masks = StructuredMasks.from_model(model)
    masks.head_mask[0] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    masks.head_mask[1, 3] = 0
    masks.ffn_mask[0, :40] = 0
    masks.ffn_mask[1, 1::2] = 0
    masks.apply(model)
    masked = logits(model, inputs)

    zeroed = masks.fold(model)
    # per layer: value weight [R, 32] and bias [R], R = masked heads · 8; FFN-in weight [R, 32] and bias [R]
    assert zeroed["bert.encoder.layer.0.attention.self.value.weight"].shape == (2 * HEAD_DIM, HIDDEN)
    assert zeroed["bert.encoder.layer.1.attention.self.value.bias"].shape == (HEAD_DIM,)
    assert zeroed["bert.encoder.layer.0.intermediate.dense.weight"].shape == (40, HIDDEN)
    assert zeroed["bert.encoder.layer.1.intermediate.dense.bias"].shape == (32,)
    assert all(t.abs().sum() > 0 for t in zeroed.values())
    assert torch.equal(logits(model, inputs), masked)  # folding under the hooks changes nothing
    masks.remove()
    model.save_pretrained(tmp_path)
    auto = AutoModelForQuestionAnswering if cls is BertForQuestionAnswering else AutoModelForSequenceClassification
    stock = auto.from_pretrained(tmp_path).eval()  # no hooks, no masks file: the pruned model all the same
    assert (logits(stock, inputs) - masked).abs().max() <= 1e-6

    masks.unfold(model, zeroed)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in live.items())


def test_folding_zeroes_the_importance_of_masked_units_only():
    """Why CAP-f folds only the saved copy: the live model's masked units keep an importance, as in the original,
    and it counts in the per-layer normalisation (§5.1); folded, it would be 0 and the ranking could change."""
    model, inputs = tiny(BertForSequenceClassification), batch()
    masks = StructuredMasks.from_model(model)
    masks.head_mask[1, 2] = 0
    masks.ffn_mask[0, :10] = 0
    unfolded = compute_importance(model, masks, [inputs], ce_loss)
    zeroed = masks.fold(model)
    folded = compute_importance(model, masks, [inputs], ce_loss)
    alive = (masks.head_mask != 0, masks.ffn_mask != 0)
    for before, after, keep in zip(unfolded, folded, alive):
        assert torch.equal(before[keep], after[keep]) and (after[~keep] == 0).all() and (before[~keep] > 0).all()
    kept = masks.head_mask[1] != 0  # layer 1's live heads rank otherwise against the other layer's
    assert not torch.allclose(normalize_by_layer(unfolded[0])[1, kept], normalize_by_layer(folded[0])[1, kept])
    masks.unfold(model, zeroed)
    assert torch.equal(compute_importance(model, masks, [inputs], ce_loss)[0], unfolded[0])
