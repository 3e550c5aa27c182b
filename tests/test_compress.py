"""Algorithm-level tests of the baseline compressors (algorithms.md §2) and their codecs."""
from __future__ import annotations

import math

import pytest
import torch

from semfl.wireless.codecs import Payload, get_codec
from semfl.wireless.compress import TernaryQuant, golomb_position_bits, keep_count, qsgd, qsgd_bits, qsgd_unit, stc, stc_bits, stc_error_accumulation, ternarize, ternary_layers, ternary_threshold, topk, topk_error_feedback


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- top-k
def test_topk_keeps_exactly_the_k_largest():
    v = _randn(1000)
    k = 37
    out = topk(v, k)
    assert int(torch.count_nonzero(out)) == k
    kept = out != 0
    assert torch.equal(out[kept], v[kept])  # values unchanged
    threshold = v.abs().sort(descending=True).values[k - 1]
    assert bool(torch.all(v[kept].abs() >= threshold)) and bool(torch.all(v[~kept].abs() <= threshold))
    assert set(kept.nonzero().reshape(-1).tolist()) == set(v.abs().argsort(descending=True)[:k].tolist())


def test_topk_ties_are_deterministic_and_exact_count():
    v = torch.tensor([1.0, -2.0, 2.0, 2.0, -2.0, 0.5])
    out = topk(v, 2)
    assert int(torch.count_nonzero(out)) == 2
    assert torch.equal(out, torch.tensor([0.0, -2.0, 2.0, 0.0, 0.0, 0.0]))  # lowest indices win
    assert torch.equal(topk(v, 0), torch.zeros(6)) and torch.equal(topk(v, 6), v)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_topk_error_feedback_identity(scope):
    delta = {"a": _randn(10, 20, seed=1), "b": _randn(300, seed=2) * 3}
    residual = {"a": _randn(10, 20, seed=3) * 0.1, "b": _randn(300, seed=4) * 0.1}
    fraction = 0.05
    sent, new_res = topk_error_feedback(delta, residual, fraction, scope)
    for n in delta:
        v = delta[n] + residual[n]
        assert torch.equal(sent[n] + new_res[n], v)
        assert torch.equal(torch.where(sent[n] != 0, sent[n], v), v)
    if scope == "layer":
        for n in delta:
            assert int(torch.count_nonzero(sent[n])) == math.ceil(fraction * delta[n].numel())
    else:
        v = torch.cat([(delta[n] + residual[n]).reshape(-1) for n in delta])
        s = torch.cat([sent[n].reshape(-1) for n in delta])
        k = math.ceil(fraction * v.numel())
        assert int(torch.count_nonzero(s)) == k
        assert torch.equal(s.abs().sort(descending=True).values[:k], v.abs().sort(descending=True).values[:k])
    # first round: no residual
    sent0, res0 = topk_error_feedback(delta, None, fraction, scope)
    for n in delta:
        assert torch.equal(sent0[n] + res0[n], delta[n])


def test_keep_count_is_ceil_without_float_noise():
    assert keep_count(0.07, 100) == 7 and keep_count(1 / 400, 100_000) == 250
    assert keep_count(0.001, 1500) == 2 and keep_count(1.0, 10) == 10 and keep_count(0.0, 10) == 0


# ----------------------------------------------------------------------------- STC
def test_stc_exactly_k_nonzeros_of_magnitude_mu():
    t = _randn(64, 50, seed=5)
    p = 0.01
    out = stc(t, p)
    k = math.ceil(p * t.numel())
    nz = out != 0
    assert int(nz.sum()) == k
    top = sorted((abs(x) for x in t.reshape(-1).tolist()), reverse=True)[:k]
    mu_hand = sum(top) / k
    mags = out[nz].abs()
    assert bool(torch.all(mags == mags[0]))
    assert math.isclose(float(mags[0]), mu_hand, rel_tol=1e-6)
    assert torch.equal(torch.sign(out[nz]), torch.sign(t[nz]))
    assert float(t[nz].abs().min()) >= top[-1]  # the kept entries are the top-k


def test_stc_ties_do_not_exceed_k():
    t = torch.tensor([3.0, -3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    out = stc(t, 0.25)  # k = 2
    assert int(torch.count_nonzero(out)) == 2
    assert torch.equal(out, torch.tensor([3.0, -3.0, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(stc(torch.zeros(5), 0.5), torch.zeros(5))


def test_stc_error_accumulation():
    delta = {"w": _randn(40, 30, seed=6), "b": _randn(30, seed=7)}
    residual = {"w": _randn(40, 30, seed=8) * 0.5, "b": _randn(30, seed=9) * 0.5}
    p = 1 / 50
    sent, new_res = stc_error_accumulation(delta, residual, p)
    for n in delta:
        acc = delta[n] + residual[n]
        assert torch.equal(sent[n], stc(acc, p))
        assert int(torch.count_nonzero(sent[n])) == math.ceil(p * acc.numel())
        torch.testing.assert_close(sent[n] + new_res[n], acc, rtol=0, atol=1e-6)
        unsent = sent[n] == 0
        assert torch.equal(new_res[n][unsent], acc[unsent])  # bitwise where nothing was sent


def test_golomb_bits_hand_computed():
    n, k = 1_000_000, 2500
    q = k / n
    phi = (math.sqrt(5) + 1) / 2
    b = 1 + math.floor(math.log2(math.log(phi - 1) / math.log(1 - q)))
    assert b == 8  # log2(0.4812 / 0.002503) = log2(192.2) = 7.59
    mean = b + 1 / (1 - (1 - q) ** (2 ** b))
    assert 10.1 < mean < 10.13
    assert math.isclose(golomb_position_bits(n, k), k * mean, rel_tol=1e-12)
    assert stc_bits(n, k) == math.ceil(k + k * mean) + 32
    assert golomb_position_bits(n, 0) == 0.0 and golomb_position_bits(100, 100) == 100.0
    # dense q: b* clipped at 0 -> unary code, k / q = N bits (the bitmap)
    assert math.isclose(golomb_position_bits(100, 60), 100.0)


def test_stc_bits_far_below_dense():
    n = 100_000
    t = _randn(n, seed=10)
    out = stc(t, 1 / 400)
    k = int(torch.count_nonzero(out))
    assert k == 250
    bits = get_codec("stc").tensor_bits(out)
    assert bits == stc_bits(n, k)
    assert bits < 0.003 * 32 * n  # ~ 250 * (1 + 9.9) + 32 ~ 2.8 kbit vs 3.2 Mbit
    assert bits < get_codec("sparse").tensor_bits(out)


# ----------------------------------------------------------------------------- FTTQ
def test_ternary_threshold_adaptive_hand_checked():
    theta = torch.arange(36, dtype=torch.float32).reshape(2, 2, 3, 3) - 17.5
    total = sum(abs(i - 17.5) for i in range(36))  # 324
    assert math.isclose(float(ternary_threshold(theta, "adaptive")), 0.07 * total / 4, rel_tol=1e-6)
    assert math.isclose(float(ternary_threshold(theta, "fixed")), 0.05 * 17.5, rel_tol=1e-6)
    out = ternarize(theta, 0.7, "adaptive")  # delta = 5.67
    expected = torch.where(theta > 5.67, 0.7, torch.where(theta < -5.67, -0.7, 0.0))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_ternarize_at_most_three_values(mode):
    theta = _randn(16, 8, 3, 3, seed=11)
    wp = torch.tensor(0.37)
    out = ternarize(theta, wp, mode)
    assert torch.unique(out).numel() == 3
    assert set(torch.unique(out).tolist()) == {-float(wp), 0.0, float(wp)}
    delta = ternary_threshold(theta, mode)
    assert torch.equal(out != 0, theta.abs() > delta)
    assert torch.equal(torch.sign(out), torch.sign(theta) * (theta.abs() > delta))


def test_ternary_straight_through_gradients():
    theta = _randn(6, 4, 3, 3, seed=12).requires_grad_(True)
    wp = torch.tensor(0.8, requires_grad=True)
    g = _randn(6, 4, 3, 3, seed=13)
    y = TernaryQuant.apply(theta, wp, "adaptive")
    assert torch.equal(y.detach(), ternarize(theta.detach(), 0.8))
    (y * g).sum().backward()
    delta = ternary_threshold(theta.detach(), "adaptive")
    big = theta.detach().abs() > delta
    assert 0 < int(big.sum()) < big.numel()
    assert torch.allclose(theta.grad, torch.where(big, 0.8 * g, g))
    hand_wp = sum(float(torch.sign(a)) * float(b) for a, b, m in zip(theta.detach().reshape(-1), g.reshape(-1), big.reshape(-1)) if m)
    assert math.isclose(float(wp.grad), hand_wp, rel_tol=1e-5, abs_tol=1e-5)


def test_ternary_layers_excludes_first_last_and_norms():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 10),
    )
    names = ternary_layers(model.named_parameters())
    assert names == ["3.weight", "5.weight"]
    assert ternary_layers(dict(model.state_dict())) == names
    assert ternary_layers([("fc.weight", torch.zeros(2, 2))]) == []


# ----------------------------------------------------------------------------- QSGD
def test_qsgd_unbiased_monte_carlo():
    x = _randn(50, seed=14)
    s, draws = 4, 4000
    gen = torch.Generator().manual_seed(15)
    samples = torch.stack([qsgd(x, s, gen) for _ in range(draws)])
    mean = samples.mean(0)
    # Var(Q_i) <= (||x||/s)^2 / 4 per entry (Bernoulli on a grid step); the mean's std per entry
    # is at most ||x|| / (2 s sqrt(draws)). Allow 5 sigma on every entry (50 entries).
    norm = float(x.norm())
    tol = 5 * norm / (2 * s * math.sqrt(draws))
    assert float((mean - x).abs().max()) < tol
    # and the empirical variance matches the Bernoulli variance of the grid rounding
    unit = qsgd_unit(norm, s)
    r = x.double().abs() / unit
    frac = r - r.floor()
    var_theory = (unit ** 2) * frac * (1 - frac)
    torch.testing.assert_close(samples.double().var(0), var_theory, atol=0.15 * unit ** 2 / 4, rtol=0.15)


@pytest.mark.parametrize("s", [1, 2, 16, 256])
def test_qsgd_values_on_grid(s):
    x = _randn(2000, seed=16) * 3
    out = qsgd(x, s, torch.Generator().manual_seed(0))
    norm = float(x.double().norm())
    unit = qsgd_unit(norm, s)
    assert norm <= s * unit <= norm * (1 + 2 ** -14)  # the grid ||x|| {0, 1/s, ..., 1}, to 2^-15
    levels = out.double() / unit
    assert torch.equal(levels, levels.round())  # exactly on the grid
    assert float(levels.abs().max()) <= s
    nz = out != 0
    assert torch.equal(torch.sign(out[nz]), torch.sign(x[nz]))
    # each entry is one of its two neighbouring grid points
    r = x.double().abs() / unit
    assert bool(torch.all((levels.abs() == r.floor()) | (levels.abs() == r.floor() + 1)))


def test_qsgd_zero_and_determinism():
    assert torch.equal(qsgd(torch.zeros(10), 8, torch.Generator().manual_seed(0)), torch.zeros(10))
    x = _randn(7, 9, seed=17)
    a = qsgd(x, 8, torch.Generator().manual_seed(123))
    b = qsgd(x, 8, torch.Generator().manual_seed(123))
    c = qsgd(x, 8, torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape and a.dtype == x.dtype


def test_qsgd_bits_formula():
    assert qsgd_bits(1000, 1) == 32 + 1000 * 2
    assert qsgd_bits(1000, 4) == 32 + 1000 * 4  # levels 0..4 need 3 bits
    assert qsgd_bits(1000, 255) == 32 + 1000 * 9
    assert qsgd_bits(1000, 256) == 32 + 1000 * 10


# ----------------------------------------------------------------------------- codecs
def _roundtrip(codec_name, tensors):
    codec = get_codec(codec_name)
    back = codec.decode(codec.encode(tensors))
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape
        assert torch.equal(back[n], t), n


def test_stc_codec_roundtrip_and_bits():
    tensors = {"w": stc(_randn(30, 20, seed=18), 0.02), "b": stc(_randn(20, seed=19), 0.2),
               "z": torch.zeros(5)}
    _roundtrip("stc", tensors)
    codec = get_codec("stc")
    expected = sum(stc_bits(t.numel(), int(torch.count_nonzero(t))) for t in tensors.values())
    assert codec.bits(tensors) == expected
    assert Payload(tensors, codec="stc", meta={"n": 5}).bits() == expected + 32
    with pytest.raises(ValueError, match="bad"):
        codec.bits({"bad": torch.tensor([1.0, -1.0, 0.5])})


def test_ternary_codec_roundtrip_and_bits():
    theta = _randn(8, 4, 3, 3, seed=20)
    tensors = {"a": ternarize(theta, 0.31), "b": ternarize(_randn(5, 7, seed=21), torch.tensor(-1.7)),
               "z": torch.zeros(3, 3)}
    _roundtrip("ternary", tensors)
    codec = get_codec("ternary")
    assert codec.tensor_bits(tensors["a"]) == 2 * theta.numel() + 32
    assert codec.bits(tensors) == sum(2 * t.numel() + 32 for t in tensors.values())
    with pytest.raises(ValueError, match="bad"):
        codec.bits({"bad": torch.tensor([1.0, -1.0, 0.0, 2.0])})


@pytest.mark.parametrize("s", [1, 4, 16, 256])
def test_qsgd_codec_roundtrip_and_bits(s):
    gen = torch.Generator().manual_seed(s)
    tensors = {"w": qsgd(_randn(40, 25, seed=22), s, gen), "b": qsgd(_randn(25, seed=23) * 1e-3, s, gen),
               "z": qsgd(torch.zeros(4), s, gen), "tiny": qsgd(torch.tensor([0.0, 5.0, 0.0]), s, gen)}
    _roundtrip(f"qsgd{s}", tensors)
    codec = get_codec(f"qsgd{s}")
    assert codec.tensor_bits(tensors["w"]) == qsgd_bits(1000, s)
    assert codec.bits(tensors) == sum(qsgd_bits(t.numel(), s) for t in tensors.values())


def test_qsgd_codec_rejects_non_grid():
    with pytest.raises(ValueError, match="bad"):
        get_codec("qsgd1").bits({"bad": torch.tensor([0.1, 0.2, 0.3])})
    with pytest.raises(ValueError, match="bad"):
        get_codec("qsgd4").bits({"bad": _randn(100, seed=24)})


def test_qsgd_codecs_registered():
    for s in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        assert get_codec(f"qsgd{s}").levels == s
