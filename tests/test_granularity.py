"""Structured movement scores (prune.granularity=structured): one score per head and per FFN neuron, tied over the
weights the unit owns; Top-K / threshold counts, the summed straight-through gradient, export, resume."""
import json
import shutil
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from helpers import REPO, composed, movement_overrides

from cap.errors import UserError
from cap.export import export_pruned, load_pruned, main
from cap.pruning.granularity import LayerUnits, unit_counts, weighted_quantile
from cap.pruning.movement import MovementScores, prunable_linears
from cap.recipes import run

HEADS, HEAD_SIZE, HIDDEN, FFN = 4, 8, 32, 64


def tiny(seed=0, layers=2):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=layers,
                                                    num_attention_heads=HEADS, intermediate_size=FFN,
                                                    initializer_range=0.2)).eval()


def structured(model, criterion="topk", seed=1):
    scores = MovementScores.attach(model, criterion, granularity="structured")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in scores.score_parameters():
            s.copy_(torch.randn(s.shape, generator=g))
    return scores


def test_one_score_per_head_and_per_neuron_held_once():
    model = tiny()
    scores = structured(model)
    assert [tuple(s.shape) for s in scores.score_parameters()] == [(HEADS,), (FFN,)] * 2
    keys = [k for k in model.state_dict() if k.endswith(".scores")]
    assert keys == [f"bert.encoder.layer.{i}.{m}.parametrizations.weight.0.scores"
                    for i in range(2) for m in ("attention.self.query", "intermediate.dense")]
    names = [n for n, _ in prunable_linears(model)]
    assert [tuple(m.shape) for m in scores.masks().values()] == [tuple(lin.weight.shape)
                                                                 for _, lin in prunable_linears(model)]
    assert list(scores.masks()) == names


def test_topk_counts_remove_the_parameters_element_topk_removes():
    # MiniLM: 12 heads of 32, hidden 384, 1536 FFN neurons; a head masks 4·32·384 entries, a neuron 2·384
    units = LayerUnits(heads=12, head_size=32, head_entries=4 * 32 * 384, neurons=1536, neuron_entries=768)
    assert units.entries == 4 * 384 * 384 + 2 * 384 * 1536
    assert [unit_counts(keep, units) for keep in (1.0, 0.5, 0.1, 0.03)] == [(12, 1536), (6, 768), (1, 166), (0, 69)]
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    for keep in (0.5, 0.1, 0.03):
        heads, neurons = unit_counts(keep, units)
        element_kept = sum(int(keep * a * b) for a, b in shapes)
        assert abs(heads * units.head_entries + neurons * units.neuron_entries - element_kept) <= 768 / 2 + 6


def test_topk_masks_keep_the_best_units_in_every_matrix_they_own():
    model = tiny()
    scores = structured(model)
    scores.set_level(0.3)  # tiny layer: round(1.2) = 1 head, then 22 neurons fill 0.3 of the layer's 8192 entries
    masks, units = scores.masks(), scores.unit_masks()
    assert units["head_mask"].sum(1).tolist() == [1, 1] and units["ffn_mask"].sum(1).tolist() == [22, 22]
    for layer, (head_scores, neuron_scores) in enumerate(zip(*[iter(scores.score_parameters())] * 2)):
        head = int(head_scores.argmax())
        assert units["head_mask"][layer].tolist() == [float(h == head) for h in range(HEADS)]
        best = set(neuron_scores.topk(22).indices.tolist())
        assert set(units["ffn_mask"][layer].nonzero().flatten().tolist()) == best
        rows = units["head_mask"][layer].repeat_interleave(HEAD_SIZE).bool()
        prefix = f"layer.{layer}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
            assert torch.equal(masks[prefix + name], rows[:, None].expand(-1, HIDDEN))
        assert torch.equal(masks[prefix + "attention.output.dense"], rows[None, :].expand(HIDDEN, -1))
        ffn = units["ffn_mask"][layer].bool()
        assert torch.equal(masks[prefix + "intermediate.dense"], ffn[:, None].expand(-1, HIDDEN))
        assert torch.equal(masks[prefix + "output.dense"], ffn[None, :].expand(HIDDEN, -1))
    assert scores.sparsity()["entries"] == pytest.approx(1 - (1024 + 22 * 64) / 8192)


def test_threshold_counts_and_floor_per_unit_group():
    model = tiny(layers=1)
    scores = MovementScores.attach(model, "soft", granularity="structured")
    head_scores, neuron_scores = scores.score_parameters()
    with torch.no_grad():
        head_scores.copy_(torch.tensor([-3.0, 0.0, 3.0, -1.0]))  # sigmoid .05 .5 .95 .27
        neuron_scores.fill_(-10.0)
        neuron_scores[5] = -9.0
    scores.set_level(0.3)
    units = scores.unit_masks()
    assert units["head_mask"].tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert units["ffn_mask"][0].nonzero().flatten().tolist() == [5]  # the floor: int(0.005·64) + 1 = 1 neuron
    with torch.no_grad():
        head_scores.fill_(-10.0)
    assert int(scores.unit_masks()["head_mask"].sum()) == 1  # and int(0.005·4) + 1 = 1 head


def test_tied_scores_get_the_summed_straight_through_gradient():
    model, plain = tiny(), tiny()
    scores = structured(model)
    scores.set_level(0.6)
    ids = torch.randint(5, 100, (3, 7), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids).logits.square().sum().backward()
    # the same masked model with the effective weights W_eff = M ⊙ W as plain leaves: ∂L/∂W_eff
    masks = scores.masks()
    with torch.no_grad():
        for (name, linear), (_, masked) in zip(prunable_linears(plain), prunable_linears(model)):
            linear.weight.copy_(masked.parametrizations.weight.original * masks[name])
    plain(input_ids=ids).logits.square().sum().backward()
    moved = {name: linear.weight.grad * masked.parametrizations.weight.original.detach()  # ∂L/∂W_eff ⊙ W
             for (name, linear), (_, masked) in zip(prunable_linears(plain), prunable_linears(model))}
    for layer, (head_scores, neuron_scores) in enumerate(zip(*[iter(scores.score_parameters())] * 2)):
        p = f"layer.{layer}."
        qkv = sum(moved[p + f"attention.self.{m}"] for m in ("query", "key", "value"))
        expected_heads = qkv.view(HEADS, HEAD_SIZE, HIDDEN).sum((1, 2)) + \
            moved[p + "attention.output.dense"].view(HIDDEN, HEADS, HEAD_SIZE).sum((0, 2))
        expected_neurons = moved[p + "intermediate.dense"].sum(1) + moved[p + "output.dense"].sum(0)
        assert expected_heads.abs().sum() > 0 and expected_neurons.abs().sum() > 0
        assert torch.allclose(head_scores.grad, expected_heads, atol=1e-5, rtol=1e-4)
        assert torch.allclose(neuron_scores.grad, expected_neurons, atol=1e-5, rtol=1e-4)


def test_regularization_is_the_mean_over_matrices_of_the_repeated_scores():
    model = tiny()
    scores = structured(model, "soft")
    heads, neurons = (torch.sigmoid(s.detach()).mean() for s in scores.score_parameters()[:2])
    other_heads, other_neurons = (torch.sigmoid(s.detach()).mean() for s in scores.score_parameters()[2:])
    expected = (4 * (heads + other_heads) + 2 * (neurons + other_neurons)) / 12
    assert scores.regularization().item() == pytest.approx(expected.item())


def test_the_controller_reads_the_quantile_in_matrix_entries():
    small, large = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0])
    assert weighted_quantile([small, large], [1, 1], 0.5) == 1.0
    assert weighted_quantile([small, large], [1, 100], 0.5) == 5.0  # the heavy unit holds most entries
    model = tiny()
    tensors, weights = structured(model, "soft").quantile_inputs()
    assert len(tensors) == 12 and weights == [HEAD_SIZE * HIDDEN] * 4 + [HIDDEN] * 2 + [HEAD_SIZE * HIDDEN] * 4 + \
        [HIDDEN] * 2
    assert MovementScores.attach(tiny(), "soft").quantile_inputs()[1] is None  # element: the sampled quantile


@pytest.mark.parametrize("criterion,level", [("topk", 0.3), ("topk", 0.1), ("soft", 0.4)])
def test_export_equals_the_masked_model(criterion, level, tmp_path):
    model = tiny(layers=3)
    scores = structured(model, criterion)
    scores.set_level(level)
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    units = scores.unit_masks()
    scores.fold()
    with torch.no_grad():  # the folded stock model computes the masked one too
        assert (model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits - expected).abs().max() <= 1e-6
    before = sum(p.numel() for p in model.parameters())
    export_pruned(model, units["head_mask"], units["ffn_mask"], tmp_path)
    loaded = load_pruned(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) < before
    assert loaded.config.heads_per_layer == units["head_mask"].sum(1).int().tolist()
    with torch.no_grad():
        assert (loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("prune", [{"granularity": "blocks", "criterion": "topk"},
                                   {"granularity": "structured", "criterion": "magnitude"}])
def test_unknown_granularities_and_structured_magnitude_are_refused(prune):
    from cap.checks import check_levels

    p = OmegaConf.create({"initial": 1.0, "final": 0.1, "target_sparsity": None, **prune})
    with pytest.raises(UserError, match="prune.granularity="):
        check_levels(p)


def test_a_structured_run_exports_small_and_resumes_to_the_same_weights(tiny_model_dir, sst2_teacher_dir, tmp_path):

    overrides = movement_overrides(tiny_model_dir, sst2_teacher_dir, "cap_m", "prune.final=0.3",
                                   "prune.granularity=structured", "trainer.save_total_limit=null",
                                   "trainer.keep_checkpoints=true")
    full = tmp_path / "full"
    rows = run(composed(overrides), full)
    assert all(abs(r["sparsity_entries"] - 0.7) < 0.005 for r in rows)  # 1 head, 22 neurons of each tiny layer
    assert not (full / "sparse").exists() and (full / "export" / "cap_export.json").exists()
    # the export predicts what the saved (folded) model does, with fewer parameters
    from transformers import AutoModelForSequenceClassification

    folded = AutoModelForSequenceClassification.from_pretrained(full / "model").eval()
    small = load_pruned(full / "export")
    ids = torch.randint(1000, 30000, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = small(input_ids=ids).logits - folded(input_ids=ids).logits
    assert difference.abs().max() <= 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in folded.parameters())
    assert main([str(full), "--out", str(tmp_path / "again")]) == tmp_path / "again"  # python -m cap.export <run>
    assert json.loads((tmp_path / "again" / "cap_export.json").read_text()) == \
        json.loads((full / "export" / "cap_export.json").read_text())
    # killed after the first epoch: its checkpoint, banks and metrics row remain
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    _, *later = sorted((killed / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for folder in [*later, killed / "model", killed / "export"]:
        shutil.rmtree(folder)
    (killed / "masks.safetensors").unlink()
    (killed / "metrics.json").write_text(json.dumps([r for r in rows if r["stage"] == 1]))
    assert [r["stage"] for r in run(composed(overrides), killed)] == [1, 2, 3]
    for folder in ("model", "export"):
        expected = load_file(str(full / folder / "model.safetensors"))
        got = load_file(str(killed / folder / "model.safetensors"))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], t) for k, t in expected.items()), folder
    assert load_file(str(killed / "masks.safetensors"))["head_mask"].equal(
        load_file(str(full / "masks.safetensors"))["head_mask"])


def test_the_speed_bench_times_what_it_says_on_a_tiny_model(monkeypatch):
    """scripts/bench_movement_speed.py's parts (not the bench itself, which runs MiniLM): the pruned models keep the
    same share of the encoder matrices at both granularities, only the structured one holds fewer parameters."""
    import importlib.util


    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # as running the script puts its folder first (interleaved.py)
    spec = importlib.util.spec_from_file_location("bench_movement_speed", REPO / "scripts" / "bench_movement_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "MIN_SECONDS", 0.005)

    def build():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(hidden_size=HIDDEN, num_hidden_layers=2,
                                                        num_attention_heads=HEADS, intermediate_size=FFN)).eval()

    dense = build()
    (small, kept_small), (zeros, kept_zeros) = (bench.pruned_model(build, g, 0.7) for g in ("structured", "element"))
    assert kept_small == pytest.approx(0.3, abs=0.005) and kept_zeros == pytest.approx(0.3, abs=0.005)
    assert bench.n_parameters(small) < bench.n_parameters(dense) == bench.n_parameters(zeros)
    timing = bench.timed_pair(dense, small, batch=2, rounds=3, seq=8)
    assert timing["ratio_range"][0] <= timing["latency_ratio"] <= timing["ratio_range"][1]
    assert timing["dense_latency_s"] > 0 and timing["calls_per_round"] >= 1


def test_a_structured_cap_soft_run_steers_lambda_on_unit_scores(tiny_model_dir, sst2_teacher_dir, tmp_path):

    overrides = movement_overrides(tiny_model_dir, sst2_teacher_dir, "cap_soft", "prune.granularity=structured",
                                   "prune.target_sparsity=0.6", "prune.final_lambda=1", "prune.score_lr=0.1",
                                   "contrast.enabled=false", "trainer.keep_checkpoints=true")
    with warnings.catch_warnings():  # a random tiny model may miss the target (see test_cap_m.py) and say so
        warnings.simplefilter("ignore", UserWarning)
        rows = run(composed(overrides), tmp_path)
    assert 0 <= rows[-1]["sparsity_entries"] <= 1 and (tmp_path / "export" / "cap_export.json").exists()
    state = json.loads(max((tmp_path / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                           key=lambda p: int(p.parent.name.split("-")[1])).read_text())
    assert any(e.get("prune_lambda", 0) > 0 for e in state["log_history"])


def test_exporting_a_run_without_unit_masks_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="not a finished CAP-m / CAP-soft run with prune.granularity=structured.*"
                                         "give --stage"):
        main([str(tmp_path)])
