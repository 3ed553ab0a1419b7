"""The contrastive term against a literal, loop-by-loop reading of spec §2; banks."""
import math

import pytest
import torch
import torch.nn.functional as F

from cap.contrastive import RepresentationBank, contrastive_loss, draw_extra_idx, mean_pool


def reference_loss(rep, bank, idx, extra_idx, tau, w_u, w_s=0.0, labels=None, bank_labels=None):
    """Spec §2 step by step, with Python loops: candidates, self masking, log-softmax, (-w)·Σ mean / count."""
    z = F.normalize(rep.double(), dim=-1)
    bank = bank.double()
    B, R = rep.size(0), bank.size(1)
    cands, ids, labs = [], [], []
    for b in range(B):
        cands.append(z[b].detach()); ids.append(int(idx[b])); labs.append(None if labels is None else int(labels[b]))
        for r in range(R):
            cands.append(bank[idx[b], r]); ids.append(int(idx[b])); labs.append(None if labels is None else int(labels[b]))
    for e in extra_idx:
        for r in range(R):
            cands.append(bank[e, r]); ids.append(int(e)); labs.append(None if bank_labels is None else int(bank_labels[e]))
    C = torch.stack(cands)
    s = z @ C.T / tau
    s = s.clone()
    for b in range(B):
        s[b, b * (R + 1)] = -1e6
    logp = torch.log_softmax(s, dim=-1)
    total = 0.0
    for w, keys, anchor in ((w_u, ids, [int(i) for i in idx]),
                            (w_s, labs, None if labels is None else [int(l) for l in labels])):
        if not w or anchor is None:
            continue
        acc, count = 0.0, 0
        for b in range(B):
            pos = [p for p in range(len(keys)) if keys[p] == anchor[b] and p != b * (R + 1)]
            acc = acc + sum(logp[b, p] for p in pos) / len(pos)
            count += sum(int(logp[b, p] != 0) for p in pos)
        total = total + (-w) * acc / count
    return total


def random_case(seed=0, B=6, R=3, N=20, H=8, k=5):
    g = torch.Generator().manual_seed(seed)
    rep = torch.randn(B, H, generator=g, requires_grad=True)
    bank = F.normalize(torch.randn(N, R, H, generator=g), dim=-1)
    idx = torch.tensor([0, 3, 7, 3, 12, 19])[:B]  # item 3 twice in the batch
    extra = torch.tensor([3, 5, 7, 11, 2])[:k]    # batch items 3 and 7 among the extras
    labels_bank = torch.randint(0, 3, (N,), generator=g)
    return rep, bank, idx, extra, labels_bank


@pytest.mark.parametrize("sup", [False, True])
def test_loss_and_gradient_equal_the_literal_reference(sup):
    rep, bank, idx, extra, bank_labels = random_case()
    labels = bank_labels[idx] if sup else None
    kwargs = dict(temperature=0.1, unsup_weight=0.3, sup_weight=3.0 if sup else 0.0)
    ours = contrastive_loss(rep, bank, idx, extra, labels=labels, bank_labels=bank_labels, **kwargs)
    (grad,) = torch.autograd.grad(ours, rep)
    rep64 = rep.detach().double().requires_grad_()
    ref = reference_loss(rep64, bank, idx, extra, 0.1, 0.3, 3.0 if sup else 0.0, labels, bank_labels)
    (ref_grad,) = torch.autograd.grad(ref, rep64)
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-5)


def test_two_item_bank_by_hand():
    # B=1, R=1, N=2, H=2. Anchor z=(1,0) is item 0, whose bank vector is (1,0); the extra is item 1, vector (0,1).
    # Candidates: [z (self, masked), bank[0]=(1,0), bank[1]=(0,1)], τ=1 -> scores [-1e6, 1, 0].
    # Positives of the anchor: bank[0] only -> loss = -log(e / (e + 1)).
    bank = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    loss = contrastive_loss(torch.tensor([[2.0, 0.0]]), bank, torch.tensor([0]), torch.tensor([1]),
                            temperature=1.0, unsup_weight=1.0)
    assert math.isclose(loss.item(), -math.log(math.e / (math.e + 1)), rel_tol=1e-6)
    # The extra drawn is the anchor's own item: positives bank[0] twice (mean of two equal terms), divided by 2
    # positive pairs (the original's normalisation) -> half the per-anchor loss, -log(e / (2e)) / 2.
    loss = contrastive_loss(torch.tensor([[2.0, 0.0]]), bank, torch.tensor([0]), torch.tensor([0]),
                            temperature=1.0, unsup_weight=1.0)
    assert math.isclose(loss.item(), -math.log(0.5) / 2, rel_tol=1e-6)


def test_supervised_term_by_hand():
    # B=2 anchors of label 0 with z=(1,0) and (0,1); R=1; no extras. τ=1.
    # Row 0 candidates: [self, bank[0]=(1,0), z1=(0,1), bank[1]=(0,1)] -> scores [-1e6, 1, 0, 0].
    # Same-label positives of row 0: bank[0], z1, bank[1] -> log-probs 1-L, -L, -L with L = log(e+2).
    bank = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    rep = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    loss = contrastive_loss(rep, bank, torch.tensor([0, 1]), torch.tensor([], dtype=torch.long), temperature=1.0,
                            unsup_weight=0.0, sup_weight=1.0, labels=labels, bank_labels=labels)
    L = math.log(math.e + 2)
    mean_row = (1 - 3 * L) / 3  # both rows are symmetric
    assert math.isclose(loss.item(), -(2 * mean_row) / 6, rel_tol=1e-6)  # 6 positive pairs


def test_gradient_reaches_only_rep():
    rep, bank, idx, extra, _ = random_case()
    bank.requires_grad_(False)
    contrastive_loss(rep, bank, idx, extra, temperature=0.1, unsup_weight=1.0).backward()
    assert rep.grad is not None and bank.grad is None


def test_per_anchor_is_the_original_times_mean_positive_count():
    rep, bank, idx, extra, _ = random_case()
    idx, extra = torch.tensor([0, 1, 2, 4, 6, 8]), torch.tensor([10, 11, 12])  # no repeats: P_b = R for all b
    kwargs = dict(temperature=0.1, unsup_weight=1.0)
    original = contrastive_loss(rep, bank, idx, extra, **kwargs)
    per_anchor = contrastive_loss(rep, bank, idx, extra, normalization="per_anchor", **kwargs)
    assert torch.allclose(per_anchor, original * 3, rtol=1e-5)  # Σ_b P_b / B = R = 3


def test_float16_bank_matches_float32():
    rep, bank, idx, extra, labels = random_case()
    kwargs = dict(temperature=0.1, unsup_weight=0.3, sup_weight=3.0, labels=labels[idx], bank_labels=labels)
    full = contrastive_loss(rep, bank, idx, extra, **kwargs)
    half = contrastive_loss(rep, bank.half(), idx, extra, **kwargs)
    assert abs(half.item() - full.item()) <= 1e-3 * abs(full.item())


def test_draw_extra_idx():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = draw_extra_idx(100, 8, 4096, g1), draw_extra_idx(100, 8, 4096, g2)
    assert torch.equal(a, b) and len(a) == 100 and len(set(a.tolist())) == 100  # min(4096 // 8, N)
    assert len(draw_extra_idx(10_000, 8, 4096, g1)) == 512


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_bank_append_never_reallocates_and_survives_save_load(tmp_path):
    labels = torch.tensor([0, 1, 1, 0])
    bank = RepresentationBank(4, 3, max_reps=3, labels=labels)
    assert bank.nbytes == 4 * 3 * 3 * 2  # N · R_max · H · float16
    ptr = bank.storage.data_ptr()
    for s in range(2):
        bank.append(F.normalize(torch.randn(4, 3), dim=-1))
    assert bank.storage.data_ptr() == ptr and bank.view().shape == (4, 2, 3)
    bank.save(tmp_path / "bank.safetensors")
    loaded = RepresentationBank.load(tmp_path / "bank.safetensors")
    assert torch.equal(loaded.view(), bank.view()) and torch.equal(loaded.labels, labels)
    assert loaded.max_reps == 3
    loaded.append(torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="full"):
        loaded.append(torch.zeros(4, 3))
    assert torch.equal(bank.gather(torch.tensor([2])), bank.view()[[2]])
