import math

import torch
import torch.nn.functional as F

from cap.losses import kd_loss, span_loss, task_loss, withheld_gradient


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


def test_a_withheld_gradient_keeps_one_term_from_some_parameters_and_changes_no_value():
    """loss = a + b + withheld_gradient(b, [q]): q gets a's gradient only, p gets a's and b's (contrast.reaches)."""
    p, q = torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([0.5, 3.0], requires_grad=True)

    def terms():
        return (p * q).sum(), (p ** 2 * q).sum() + q.pow(3).sum()  # a and b both reach p and q

    a, b = terms()
    loss = a + b + withheld_gradient(b, [q])
    assert loss.item() == (a + b).item()
    loss.backward()
    a_p, a_q = torch.autograd.grad(terms()[0], [p, q])
    b_p = torch.autograd.grad(terms()[1], [p])[0]
    assert torch.allclose(q.grad, a_q) and torch.allclose(p.grad, a_p + b_p)
    assert withheld_gradient(torch.tensor(2.0), [q]).item() == 0.0  # a term without a graph: nothing to withhold
