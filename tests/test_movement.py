"""Movement pruning components: binarizers, scores on a stock model, the cubic schedule, λ, the controller."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from cap.errors import UserError
from cap.pruning.movement import (MovementScores, SparsityController, lambda_schedule, prunable_linears,
                                  schedule_phases, threshold_mask, threshold_schedule, topk_mask)


def tiny(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64)).eval()


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.1, 0.03, 0.0])
def test_topk_keeps_exactly_int_keep_numel(keep):
    scores = torch.randint(0, 5, (37, 23)).float()  # many ties
    assert int(topk_mask(scores, keep).sum()) == int(keep * scores.numel())


def test_threshold_mask_and_its_floor():
    scores = torch.tensor([[-3.0, 0.0], [3.0, -1.0]])
    assert threshold_mask(scores, 0.3).tolist() == [[0.0, 1.0], [1.0, 0.0]]  # sigmoid: .05 .5 / .95 .27
    low = torch.full((40, 50), -10.0)
    low[3, 7] = -9.0
    mask = threshold_mask(low, 0.1)
    assert int(mask.sum()) == int(0.005 * 2000) + 1 and mask[3, 7] == 1  # the 0.5 % floor keeps the top scores


def test_scores_get_straight_through_gradients():
    model = tiny()
    scores = MovementScores.attach(model, "topk")
    scores.set_level(0.5)
    linear = model.bert.encoder.layer[0].attention.self.query
    out = model(input_ids=torch.randint(5, 100, (2, 6))).logits.sum()
    out.backward()
    s = linear.parametrizations.weight[0].scores
    w = linear.parametrizations.weight.original
    # ∂L/∂S = ∂L/∂W_eff ⊙ W, and ∂L/∂W = ∂L/∂W_eff ⊙ M  ->  on kept entries ∂L/∂S = ∂L/∂W ⊙ W
    mask = topk_mask(s.detach(), 0.5).bool()
    assert s.grad.abs().sum() > 0
    assert torch.allclose(s.grad[mask], (w.grad * w.detach())[mask], atol=1e-6)


def test_param_groups_split_weights_from_scores():
    model = tiny()
    scores = MovementScores.attach(model, "topk")
    weights, no_decay, own = scores.param_groups(lr=3e-5, weight_decay=0.01, score_lr=1e-2)
    assert (own["lr"], own["weight_decay"], weights["lr"], weights["weight_decay"]) == (1e-2, 0.0, 3e-5, 0.01)
    assert (no_decay["lr"], no_decay["weight_decay"]) == (3e-5, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    # biases and LayerNorm weights get no weight decay, as in the original and the Hugging Face Trainer
    assert {names[id(p)] for p in no_decay["params"]} == {n for n in names.values()
                                                          if n.endswith("bias") or "LayerNorm" in n}
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in weights["params"])
    ids = [id(p) for g in (weights, no_decay, own) for p in g["params"]]
    # every trainable parameter in exactly one group, the 12 score matrices (2 layers x 6) in their own
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(own["params"]) == 12
    assert {id(p) for p in own["params"]} == {id(s) for s in scores.score_parameters()}


def test_dense_level_leaves_outputs_unchanged_and_fold_gives_a_stock_model():
    model, reference = tiny(), tiny()
    ids = torch.randint(5, 100, (2, 7))
    scores = MovementScores.attach(model, "topk")
    assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    with torch.no_grad():
        for p in scores.score_parameters():
            p.normal_()
    scores.set_level(0.3)
    masked = model(input_ids=ids).logits
    masks = scores.masks()
    scores.fold()
    assert not any("parametrizations" in k for k in model.state_dict())
    assert torch.allclose(model(input_ids=ids).logits, masked)
    query = model.bert.encoder.layer[1].attention.self.query.weight
    assert torch.equal(query == 0, ~masks["layer.1.attention.self.query"])
    assert scores.sparsity is not None and abs((query == 0).float().mean().item() - 0.7) < 0.01


def test_regularization_and_sparsity_on_known_scores():
    model = tiny()
    scores = MovementScores.attach(model, "soft", init=0.0)
    assert scores.regularization().item() == pytest.approx(0.5)  # sigmoid(0) everywhere
    scores.set_level(0.6)  # everything below the threshold: only the 0.5 % floor survives
    sparsity = scores.sparsity()
    assert 0.99 < sparsity["entries"] < 1 and sparsity["encoder_params"] < sparsity["entries"]


def test_schedule_matches_the_worked_qqp_table():
    # spec §5.4: QQP, batch 32, 11,371 steps/epoch, T = 113,710, W = 11000, iw = 2, fw = 3, keep 1 -> 0.03
    expected = [1.000, 0.964, 0.515, 0.240, 0.095, 0.039, 0.030, 0.030, 0.030]
    got = [threshold_schedule((e + 1) * 11371, total_steps=113710, warmup_steps=11000, initial=1.0, final=0.03,
                              initial_warmup=2, final_warmup=3) for e in range(9)]
    assert [round(v, 3) for v in got] == expected


def test_schedule_phases_count_the_updates_of_each_branch():
    # QQP (spec §5.4): updates 0..22000 dense, the last 3·11000 - 1 at the final level, the ramp between
    assert schedule_phases(total_steps=113710, warmup_steps=11000, initial_warmup=2, final_warmup=3) == (
        22001, 58710, 32999)
    for T, W, iw, fw in [(12, 1, 1, 1), (4, 1, 0, 1), (100, 30, 2, 3), (5, 11000, 2, 3), (7, 2, 0.5, 0), (1, 0, 0, 0)]:
        kw = dict(total_steps=T, warmup_steps=W, initial_warmup=iw, final_warmup=fw)
        branches = ["initial" if s <= iw * W else "final" if s > T - fw * W else "ramp" for s in range(T)]
        assert schedule_phases(**kw) == tuple(branches.count(b) for b in ("initial", "ramp", "final"))
        levels = [threshold_schedule(s, initial=1.0, final=0.1, **kw) for s in range(T)]
        initial, ramp, _ = schedule_phases(**kw)
        assert levels[:initial] == [1.0] * initial and all(0.1 <= v < 1 for v in levels[initial:initial + ramp])


def schedule_cfg(warmup, epochs=2, max_steps=-1, initial_warmup=2, final_warmup=3):
    from omegaconf import OmegaConf

    return OmegaConf.create({"trainer": {"warmup": warmup, "epochs": epochs, "max_steps": max_steps},
                             "prune": {"initial_warmup": initial_warmup, "final_warmup": final_warmup}})


def test_a_schedule_that_never_prunes_is_refused_with_its_numbers():
    from cap.checks import check_schedule

    # `method=cap_m trainer.epochs=2` on SST-2: 2 x 2105 updates, the paper's W = 11000 for QQP
    with pytest.raises(UserError) as err:
        check_schedule(schedule_cfg(11000), 4210, 11000)
    message = str(err.value)
    assert "\n" not in message
    for part in ("prune.initial_warmup·W = 2·11000 = 22000 updates", "4210 updates (2 epochs of 2105)",
                 "pruning would never start", "W = trainer.warmup = 11000", "trainer.warmup=0.1: W=421"):
        assert part in message, message
    with pytest.raises(UserError, match=r"trainer.max_steps=2\)"):
        check_schedule(schedule_cfg(11000, max_steps=2), 2, 11000)


def test_a_schedule_without_a_ramp_is_refused_and_a_short_ramp_warned():
    from cap.checks import check_schedule

    # 100 updates, W = 30: 61 dense, the last 89 final -> the level jumps at update 61
    with pytest.raises(UserError, match=r"none of the run's 100 updates .* jump to the final one at update 61"):
        check_schedule(schedule_cfg(0.3, epochs=1), 100, 30)
    warning = check_schedule(schedule_cfg(19, epochs=1), 100, 19)  # 39 dense, 5 on the ramp, 56 final
    assert "over only 5 of the run's 100 updates (1 epoch of 100), 5 %" in warning
    assert "trainer.warmup=0.1: W=10" in warning
    assert check_schedule(schedule_cfg(0.1, epochs=1), 100, 10) is None  # the paper's proportions: a 50 % ramp
    assert check_schedule(schedule_cfg(1, epochs=1), 12, 1) is None  # the tiny end-to-end tests' schedule


def test_every_movement_preset_fits_its_run():
    from helpers import REPO, composed

    from cap.distributed import batch_split
    from cap.checks import check_schedule, planned_updates

    # training features of the paper's data (hub QQP and MNLI; SQuAD windows at 384/128) or the preset's subset
    sizes = {"qqp": 363846, "mnli": 392702, "squad": 88524}
    presets = sorted(str(f.relative_to(REPO / "conf" / "experiment"))[:-5]
                     for f in (REPO / "conf" / "experiment").rglob("*.yaml"))
    checked = 0
    for name in presets:
        cfg = composed([f"experiment={name}"])
        if cfg.method.name in ("cap_m", "cap_soft"):
            total, warmup = planned_updates(cfg, cfg.data.max_train_samples or sizes[cfg.task.name])
            assert check_schedule(cfg, total, warmup) is None, name
            checked += 1
    assert checked == 20
    # trainer.batch_size is the global batch: QQP's 113,710 updates and W = 11,000 on 1, 2, 4 or 8 processes
    qqp = composed(["experiment=paper/cap_m/qqp_90"])
    assert planned_updates(qqp, sizes["qqp"]) == (113710, 11000)
    assert [batch_split(qqp.trainer.batch_size, None, world) for world in (1, 2, 4, 8)] == [(32, 1), (16, 1), (8, 1),
                                                                                             (4, 1)]


def test_lambda_ramps_with_the_threshold():
    assert lambda_schedule(0.0, final_lambda=190, final=0.1) == 0
    assert lambda_schedule(0.05, final_lambda=190, final=0.1) == pytest.approx(95)
    assert lambda_schedule(0.1, final_lambda=190, final=0.1) == pytest.approx(190)


def test_controller_pushes_harder_when_the_scores_fall_too_slowly():
    def steps(velocity):  # scores falling by `velocity` per update, 100 updates from the end, lr 0.01
        c = SparsityController(target=0.5, initial_lambda=10, final_threshold=0.1, total_steps=200)
        scores = [torch.linspace(-1, 1, 101)]
        for step in range(100, 104):
            lam = c.update([s + velocity * (step - 100) for s in scores], step, lr=0.01)
        return c, lam

    # the cut is logit(0.1) = -2.2: from the median 0 it takes 50 updates of travel (-0.044 per update)
    assert steps(0.0)[1] > 10            # standing still: more λ
    assert steps(-0.2)[1] < 10           # falling 5x too fast: less λ
    c, _ = steps(-0.01)
    other = SparsityController(target=0.5, initial_lambda=1, final_threshold=0.1, total_steps=200)
    other.load_state_dict(c.state_dict())
    assert (other.lam, other.quantile, other.velocity) == (c.lam, c.quantile, c.velocity)


def test_controller_is_off_during_the_initial_warmup():
    c = SparsityController(target=0.5, initial_lambda=10, final_threshold=0.1, total_steps=200)
    assert c.update([torch.zeros(10)], 0, lr=0.01, active=False) == 0


def test_controller_reads_the_quantile_on_a_fixed_sample():
    scores = [torch.randn(200, 50, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    full = float(torch.cat([s.flatten() for s in scores]).quantile(0.7))
    c = SparsityController(target=0.7, initial_lambda=1, final_threshold=0.1, total_steps=10, sample=3000)
    assert abs(c._quantile(scores) - full) < 0.05 and c._quantile(scores) == c._quantile(scores)
    assert sum(r.numel() for r in c._rows) == 3000


def train_to_target(target: float, seed: int, updates: int = 200) -> float:
    """CAP-soft with prune.target_sparsity on a tiny BERT that learns a counting task (is there more of tokens 4-19
    than of 48-63?): the real MovementSchedule sets τ and λ before every update, as in the Trainer; AdamW with the
    scores' own group, linear LR warm-up and decay. Returns the sparsity at the final threshold."""
    from types import SimpleNamespace

    from transformers import get_linear_schedule_with_warmup

    from cap.pruning.movement import PruneSchedule
    from cap.recipes.movement import MovementSchedule

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=16))
    scores = MovementScores.attach(model, "soft")
    warmup = updates // 10
    schedule = MovementSchedule(PruneSchedule(criterion="soft", initial=0.0, final=0.1, initial_warmup=2,
                                              final_warmup=3, final_lambda=1.0, total_steps=updates,
                                              warmup_steps=warmup),
                                scores, SparsityController(target, 1.0, 0.1, updates))
    optimizer = torch.optim.AdamW(scores.param_groups(lr=1e-3, weight_decay=0.01, score_lr=0.03))
    lr_schedule = get_linear_schedule_with_warmup(optimizer, warmup, updates)
    draws = torch.Generator().manual_seed(seed)
    for step in range(updates):
        schedule.on_step_begin(None, SimpleNamespace(global_step=step), None, optimizer=optimizer)
        tokens = torch.randint(4, 64, (32, 12), generator=draws)
        labels = ((tokens < 20).sum(1) > (tokens >= 48).sum(1)).long()
        loss = model(input_ids=tokens, labels=labels).loss + schedule.lam * scores.regularization()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    scores.set_level(0.1)
    return scores.sparsity()["entries"]


@pytest.mark.parametrize("target,seed", [(0.6, 0), (0.9, 1)])
def test_controller_lands_within_half_a_point_of_the_target(target, seed):
    assert abs(train_to_target(target, seed) - target) <= 0.005


def test_controller_says_when_the_run_missed_its_target():
    c = SparsityController(target=0.6, initial_lambda=1, final_threshold=0.1, total_steps=10)
    assert c.missed(0.604) is None
    assert "-1.20 points" in c.missed(0.588) and "prune.score_lr" in c.missed(0.588)


def test_magnitude_criterion_keeps_the_largest_weights_and_learns_no_scores():
    model = tiny()
    originals = {name: linear.weight.detach().clone() for name, linear in prunable_linears(model)}
    scores = MovementScores.attach(model, "magnitude")
    scores.set_level(0.3)
    for name, mask in scores.masks().items():
        w = originals[name].abs()
        k = int(0.3 * w.numel())
        assert int(mask.sum()) == k and w[mask].min() >= w[~mask].max()  # the k largest |W| of the matrix
    ids = torch.randint(0, 100, (4, 8))
    model.train()
    model(input_ids=ids).logits.sum().backward()
    for name, linear in prunable_linears(model):
        weight = linear.parametrizations.weight
        assert weight[0].scores.grad is None  # nothing flows to the scores
        assert (weight.original.grad[~scores.masks()[name]] == 0).all()  # nor to the removed weights
    assert scores.sparsity()["entries"] == pytest.approx(0.7, abs=0.01)
