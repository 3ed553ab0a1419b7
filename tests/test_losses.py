import math

import torch
import torch.nn.functional as F

from cap.losses import kd_loss, span_loss, task_loss


def test_kd_is_zero_for_identical_logits_and_matches_hand_value():
    z = torch.tensor([[1.0, 2.0, 0.5]])
    assert kd_loss(z, z, temperature=2.0).item() == 0.0
    # two classes, T=1: KL([.5,.5] || softmax([0, ln 3]) = [.25,.75]) = .5 ln(.5/.25) + .5 ln(.5/.75)
    student = torch.tensor([[0.0, math.log(3.0)]])
    teacher = torch.zeros(1, 2)
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert math.isclose(kd_loss(student, teacher, 1.0).item(), expected, rel_tol=1e-6)


def test_kd_scales_with_t_squared_and_averages_over_batch():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    T = 2.0
    manual = sum(
        F.kl_div(F.log_softmax(s[i] / T, -1), F.softmax(t[i] / T, -1), reduction="sum") for i in range(4)
    ) / 4 * T * T
    assert torch.allclose(kd_loss(s, t, T), manual, atol=1e-6)


def test_task_loss_classification_and_regression():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0])
    assert torch.allclose(task_loss(logits, labels), F.cross_entropy(logits, labels))
    assert torch.allclose(task_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0])), torch.tensor(1.0))


def test_span_loss_ignores_positions_outside_the_sequence():
    start = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    end = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    # second item's answer lies beyond the sequence (position 9 -> clamped to 3 -> ignored)
    loss = span_loss(start, end, torch.tensor([0, 9]), torch.tensor([1, 9]))
    expected = (F.cross_entropy(start[:1], torch.tensor([0])) + F.cross_entropy(end[:1], torch.tensor([1]))) / 2
    assert torch.allclose(loss, expected)
