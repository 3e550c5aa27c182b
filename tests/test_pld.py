"""PLD (PSFL eqs 19-25, Algorithm 1): every loss term by hand, detaching, and real training steps."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from semfl.wireless.channel import Channel, seed_channels
from semfl.config import TrainConfig
from semfl.models import ImageSpec, SemanticOutput, build_model
from semfl.methods.psfl.pld import PLDLosses, pld_losses, pld_step, pld_train
from semfl.methods.psfl.agp import magnitude_masks
from semfl.training import make_optimizer, weights_of

B, CLASSES = 3, 3
IMG = (1, 2, 2)
TOKENS, DIM = 2, 4


# ---------------------------------------------------------------- a hand-made batch

def _classifier() -> nn.Module:
    lin = nn.Linear(4, CLASSES)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, 1.0, 2.0, -0.5], [0.3, 0.7, -1.2, 1.1]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2, 0.05]))
    clf = nn.Sequential(nn.Flatten(), lin)
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf


def _batch():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(B, *IMG, generator=g)
    labels = torch.tensor([0, 2, 1])

    def out(scale):
        recon = torch.rand(B, *IMG, generator=g).requires_grad_()
        S = (scale * torch.randn(B, TOKENS, DIM, generator=g)).requires_grad_()
        C = (scale * torch.randn(B, TOKENS, DIM, generator=g)).requires_grad_()
        return SemanticOutput(S=S, X=torch.zeros(B, 4, dtype=torch.complex64), C=C, recon=recon)

    return images, labels, out(1.0), out(0.7)


# manual formulas (no torch.nn.functional)
W = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, 1.0, 2.0, -0.5], [0.3, 0.7, -1.2, 1.1]])
BIAS = torch.tensor([0.1, -0.2, 0.05])


def _logits(recon):
    return recon.reshape(recon.shape[0], -1) @ W.T + BIAS


def _softmax(z):
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _ce(p, labels):
    return -torch.log(p[torch.arange(len(labels)), labels]).sum() / len(labels)


def _mse(a, b):
    return ((a - b) ** 2).sum() / a.numel()


def _kl(p, q):  # KL(p || q), batch mean
    return (p * (torch.log(p) - torch.log(q))).sum() / p.shape[0]


def _hand(images, labels, mo, so):
    pm, ps = _softmax(_logits(mo.recon)), _softmax(_logits(so.recon))
    m_task = _ce(pm, labels) + _mse(images, mo.recon)
    s_task = _ce(ps, labels) + _mse(images, so.recon)
    m_dis = _kl(ps, pm) / s_task  # mentor pulled towards the student's distribution
    s_dis = _kl(pm, ps) / m_task
    sem = (_mse(mo.S, so.S) + _mse(mo.C, so.C)) / (m_task + s_task)
    return dict(pm=pm, ps=ps, m_ce=_ce(pm, labels), s_ce=_ce(ps, labels), m_mse=_mse(images, mo.recon),
                s_mse=_mse(images, so.recon), m_task=m_task, s_task=s_task, m_dis=m_dis, s_dis=s_dis, sem=sem,
                m_total=m_task + m_dis + sem, s_total=s_task + s_dis + sem)


def test_every_term_matches_hand_formulas():
    images, labels, mo, so = _batch()
    losses = pld_losses(mo, so, images, labels, _classifier())
    h = {k: v.detach() for k, v in _hand(images, labels, mo, so).items()}
    close = dict(abs=1e-6)
    assert losses.mentor_ce == pytest.approx(float(h["m_ce"]), **close)
    assert losses.student_ce == pytest.approx(float(h["s_ce"]), **close)
    assert losses.mentor_mse == pytest.approx(float(h["m_mse"]), **close)
    assert losses.student_mse == pytest.approx(float(h["s_mse"]), **close)
    assert losses.mentor_task == pytest.approx(float(h["m_task"]), **close)  # (19)
    assert losses.student_task == pytest.approx(float(h["s_task"]), **close)  # (20)
    assert losses.mentor_dis == pytest.approx(float(h["m_dis"]), **close)  # (21)
    assert losses.student_dis == pytest.approx(float(h["s_dis"]), **close)  # (22)
    assert losses.sem == pytest.approx(float(h["sem"]), **close)  # (23)
    assert losses.mentor_total.item() == pytest.approx(float(h["m_total"]), **close)  # (24)
    assert losses.student_total.item() == pytest.approx(float(h["s_total"]), **close)  # (25)
    assert losses.mentor_kl == pytest.approx(float(_kl(h["ps"], h["pm"])), **close)
    assert losses.student_kl == pytest.approx(float(_kl(h["pm"], h["ps"])), **close)
    # the two KL directions really differ on this batch (the direction matters)
    assert abs(losses.mentor_kl - losses.student_kl) > 1e-4
    floats = losses.floats()
    assert floats["mentor_total"] == pytest.approx(float(h["m_total"]), **close)
    assert all(isinstance(v, float) for v in floats.values())


def test_totals_do_not_reach_the_other_model():
    images, labels, mo, so = _batch()
    losses = pld_losses(mo, so, images, labels, _classifier())
    for total, other in ((losses.student_total, mo), (losses.mentor_total, so)):
        grads = torch.autograd.grad(total, [other.recon, other.S, other.C], allow_unused=True, retain_graph=True)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def _own_grad_by_hand(images, labels, own, other, own_is_student):
    """Gradient of [own task + KL(p_other_const || p_own) / c1 + sem(own, other_const) / c2]."""
    h = _hand(images, labels, *((other, own) if own_is_student else (own, other)))
    c1 = (h["m_task"] if own_is_student else h["s_task"]).item()  # the other model's task loss
    c2 = (h["m_task"] + h["s_task"]).item()
    p_other = _softmax(_logits(other.recon.detach()))
    recon, S, C = (own.recon.detach().clone().requires_grad_(), own.S.detach().clone().requires_grad_(),
                   own.C.detach().clone().requires_grad_())
    p_own = _softmax(_logits(recon))
    task = _ce(p_own, labels) + _mse(images, recon)
    loss = task + _kl(p_other, p_own) / c1 + (_mse(other.S.detach(), S) + _mse(other.C.detach(), C)) / c2
    return torch.autograd.grad(loss, [recon, S, C])


@pytest.mark.parametrize("role", ["student", "mentor"])
def test_gradient_equals_constant_divisor_form(role):
    images, labels, mo, so = _batch()
    losses = pld_losses(mo, so, images, labels, _classifier())
    own, other = (so, mo) if role == "student" else (mo, so)
    total = losses.student_total if role == "student" else losses.mentor_total
    got = torch.autograd.grad(total, [own.recon, own.S, own.C])
    want = _own_grad_by_hand(images, labels, own, other, own_is_student=(role == "student"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(g) > 0  # the gradient flows through the frozen classifier


def test_single_backward_equals_two_separate():
    images, labels, mo, so = _batch()
    clf = _classifier()
    leaves_m, leaves_s = [mo.recon, mo.S, mo.C], [so.recon, so.S, so.C]
    losses = pld_losses(mo, so, images, labels, clf)
    sep_m = torch.autograd.grad(losses.mentor_total, leaves_m, retain_graph=True)
    sep_s = torch.autograd.grad(losses.student_total, leaves_s)
    losses = pld_losses(mo, so, images, labels, clf)
    joint = torch.autograd.grad(losses.mentor_total + losses.student_total, leaves_m + leaves_s)
    for a, b in zip(joint, sep_m + sep_s):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(p.grad is None for p in clf.parameters())


def test_shape_mismatch_is_an_error():
    images, labels, mo, so = _batch()
    so.S = so.S[:, :1]
    with pytest.raises(ValueError, match="same shape"):
        pld_losses(mo, so, images, labels, _classifier())


# ---------------------------------------------------------------- real tiny models

SPEC = ImageSpec(1, 28, 28, 10)


def _models():
    seed_channels(0)
    torch.manual_seed(0)
    mentor = build_model("gsc-m", "tiny", SPEC, Channel("awgn"))
    student = build_model("csc", "tiny", SPEC, Channel("awgn"))
    torch.manual_seed(1)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    for p in clf.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    coarse = torch.rand(32, 1, 7, 7, generator=g)
    x = F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)  # smooth images
    y = torch.randint(0, 10, (32,), generator=g)
    return mentor, student, clf, x, y


def _changed(before, model):
    after = weights_of(model)
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_pld_step_updates_both_models():
    mentor, student, clf, x, y = _models()
    cfg = TrainConfig(lr=0.05)
    m0, s0 = weights_of(mentor), weights_of(student)
    losses = pld_step(mentor, student, make_optimizer(mentor.parameters(), cfg),
                      make_optimizer(student.parameters(), cfg), x[:8], y[:8], clf, 10.0)
    assert isinstance(losses, PLDLosses)
    assert math.isfinite(losses.mentor_total.item()) and math.isfinite(losses.student_total.item())
    assert len(_changed(m0, mentor)) > len(m0) // 2
    assert len(_changed(s0, student)) > len(s0) // 2
    assert all(p.grad is None for p in clf.parameters())


def test_masked_student_weights_stay_zero():
    mentor, student, clf, x, y = _models()
    cfg = TrainConfig(lr=0.05, local_epochs=3, batch_size=8)
    masks = magnitude_masks(weights_of(student), 0.5)
    before = weights_of(student)
    out = pld_train(mentor, student, x, y, cfg, 10.0, clf, torch.Generator().manual_seed(0), student_masks=masks)
    assert out["steps"] == 3 * 4 and out["samples"] == 3 * 32
    params = dict(student.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][mask == 0] == 0), name
        assert not torch.equal(params[name][mask == 1], before[name][mask == 1]), name
    assert {"mentor_total", "student_total", "mentor_task", "student_task", "mentor_dis", "student_dis", "sem",
            "mentor_ce", "student_ce", "mentor_mse", "student_mse"} <= set(out)


def _run(epochs_calls: int):
    mentor, student, clf, x, y = _models()
    cfg = TrainConfig(lr=0.05, local_epochs=1, batch_size=16)
    gen = torch.Generator().manual_seed(0)
    history, state = [], None
    for _ in range(epochs_calls):
        out = pld_train(mentor, student, x, y, cfg, 15.0, clf, gen, mentor_opt_state=state)
        state = out["mentor_opt_state"]
        history.append(out)
    return history, weights_of(student)


def test_losses_decrease_and_are_deterministic():
    history, w1 = _run(6)
    first, last = history[0], history[-1]
    assert last["mentor_total"] < first["mentor_total"]
    assert last["student_total"] < first["student_total"]
    assert history[-1]["mentor_opt_state"]["state"]  # momentum buffers carried across calls
    history2, w2 = _run(6)
    assert [h["student_total"] for h in history] == [h["student_total"] for h in history2]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
