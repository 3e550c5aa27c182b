"""Statistics, determinism and differentiability of semfl.wireless.channel (Sionna-based)."""
from __future__ import annotations

import math

import pytest
import torch

import sionna.phy
from sionna.phy.channel import AWGN

from semfl.wireless.channel import Channel, ChannelDraw, make_channel, power_normalize, seed_channels, snr_to_noise_var
from semfl.config import ChannelConfig


def _symbols(batch: int, n: int, seed: int = 0, dtype=torch.complex64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return power_normalize(torch.randn(batch, n, generator=g, dtype=dtype))


def test_power_normalize_unit_power_per_row():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.01, 1.0, 7.0, 300.0]).unsqueeze(1)
    z = torch.randn(4, 100, generator=g, dtype=torch.complex64) * scale
    p = (power_normalize(z).abs() ** 2).mean(dim=1)
    torch.testing.assert_close(p, torch.ones(4), rtol=1e-5, atol=1e-5)
    # direction is unchanged, only the scale
    zn = power_normalize(z)
    torch.testing.assert_close(zn / zn.abs(), z / z.abs(), rtol=1e-5, atol=1e-5)


def test_power_normalize_eps_safe_and_differentiable():
    z = torch.zeros(2, 8, dtype=torch.complex64)
    z[1] = torch.randn(8, dtype=torch.complex64)
    z.requires_grad_(True)
    out = power_normalize(z)
    assert torch.isfinite(torch.view_as_real(out)).all()
    assert out[0].abs().max() == 0
    torch.view_as_real(out).sum().backward()
    assert torch.isfinite(torch.view_as_real(z.grad)).all()
    assert z.grad[1].abs().sum() > 0


def test_snr_to_noise_var_keeps_type():
    assert snr_to_noise_var(10.0) == pytest.approx(0.1)
    assert snr_to_noise_var(0) == pytest.approx(1.0)
    t = snr_to_noise_var(torch.tensor([0.0, 10.0, 20.0]))
    assert isinstance(t, torch.Tensor)
    torch.testing.assert_close(t, torch.tensor([1.0, 0.1, 0.01]))


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_awgn_noise_variance_matches_n0(snr_db):
    seed_channels(1)
    x = _symbols(256, 4096)
    y = Channel("awgn")(x, snr_db)
    n = y - x
    n0 = 10 ** (-snr_db / 10)
    assert (n.abs() ** 2).mean().item() == pytest.approx(n0, rel=0.03)
    # circular: N0/2 per real dimension, zero mean
    assert n.real.var().item() == pytest.approx(n0 / 2, rel=0.03)
    assert n.imag.var().item() == pytest.approx(n0 / 2, rel=0.03)
    assert abs(n.mean().item()) < 0.01 * math.sqrt(n0)


def test_per_sample_snr_gives_each_row_its_own_noise_variance():
    seed_channels(2)
    snr = torch.tensor([0.0, 5.0, 10.0, 20.0, 30.0])
    x = _symbols(5, 200_000)
    y = Channel("awgn")(x, snr)
    measured = ((y - x).abs() ** 2).mean(dim=1)
    torch.testing.assert_close(measured, 10 ** (-snr / 10), rtol=0.03, atol=0.0)
    # the draw carries the same per-row N0
    d = Channel("awgn").sample(5, 10, snr)
    torch.testing.assert_close(d.noise_var, (10 ** (-snr / 10)).unsqueeze(1))


def test_bad_snr_shape_is_rejected():
    with pytest.raises(ValueError, match="snr_db"):
        Channel("awgn")(_symbols(4, 8), torch.zeros(3))


@pytest.mark.parametrize("kind,equalize", [("awgn", True), ("rayleigh", True), ("rayleigh", False)])
def test_gradients_flow_through_channel(kind, equalize):
    seed_channels(3)
    x = _symbols(8, 32).requires_grad_(True)
    y = Channel(kind, equalize)(x, torch.full((8,), 10.0))
    y.abs().sum().backward()
    g = torch.view_as_real(x.grad)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # and through power_normalize to a real encoder output
    w = torch.randn(8, 64, requires_grad=True)
    z = power_normalize(torch.view_as_complex(w.reshape(8, 32, 2)))
    Channel(kind, equalize)(z, 5.0, Channel(kind, equalize).sample(8, 32, 5.0)).abs().sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_rayleigh_coefficient_statistics():
    seed_channels(4)
    h = Channel("rayleigh").sample(200_000, 1, 10.0).h
    assert h.shape == (200_000, 1) and h.is_complex()
    g = h.abs() ** 2
    assert g.mean().item() == pytest.approx(1.0, rel=0.05)
    assert h.real.var().item() == pytest.approx(0.5, rel=0.05)
    assert h.imag.var().item() == pytest.approx(0.5, rel=0.05)
    assert abs(h.mean().item()) < 0.01
    # |h| Rayleigh <=> |h|^2 ~ Exp(1): check the tail at two points
    assert (g > 1).float().mean().item() == pytest.approx(math.exp(-1), abs=0.02)
    assert (g > 0.1).float().mean().item() == pytest.approx(math.exp(-0.1), abs=0.02)


def test_rayleigh_is_block_fading_per_image():
    seed_channels(5)
    x = _symbols(64, 100)
    y = Channel("rayleigh", equalize=False)(x, 300.0)  # N0 = 1e-30: y = h x
    ratio = y / x
    assert (ratio - ratio[:, :1]).abs().max().item() < 1e-4
    assert ratio[:, 0].abs().std().item() > 0.1  # but h differs between images


def test_equalised_rayleigh_recovers_x_at_high_snr_unequalised_does_not():
    x = _symbols(2000, 64)
    seed_channels(6)
    eq = Channel("rayleigh", equalize=True)(x, 40.0)
    seed_channels(6)
    raw = Channel("rayleigh", equalize=False)(x, 40.0)
    rel = lambda a: ((a - x).abs().norm() / x.abs().norm()).item()  # noqa: E731
    assert rel(eq) < 0.1
    assert rel(raw) > 0.5


def test_mmse_equaliser_formula_and_error():
    snr = 0.0
    ch = Channel("rayleigh", equalize=True)
    x = _symbols(20_000, 64)
    seed_channels(7)
    d = ch.sample(20_000, 64, snr)
    xh = ch(x, snr, draw=d)
    y = d.h * x + d.noise
    torch.testing.assert_close(xh, d.h.conj() * y / (d.h.abs() ** 2 + d.noise_var))
    # MMSE error given h is N0 / (|h|^2 + N0) for unit-power symbols
    theory = (d.noise_var / (d.h.abs() ** 2 + d.noise_var)).mean().item()
    assert ((xh - x).abs() ** 2).mean().item() == pytest.approx(theory, rel=0.03)


@pytest.mark.parametrize("kind", ["awgn", "rayleigh"])
def test_seed_channels_determinism(kind):
    x = _symbols(16, 32)
    ch = Channel(kind)
    seed_channels(11)
    a = ch(x, 5.0)
    seed_channels(11)
    b = ch(x, 5.0)
    seed_channels(12)
    c = ch(x, 5.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_draw_path_awgn_is_exactly_x_plus_noise():
    x = _symbols(8, 16)
    ch = Channel("awgn")
    d = ch.sample(8, 16, torch.linspace(0, 20, 8))
    assert d.h is None and d.noise.shape == (8, 16) and d.noise_var.shape == (8, 1)
    assert torch.equal(ch(x, 123.0, draw=d), x + d.noise)  # snr_db is ignored with a draw


@pytest.mark.parametrize("kind", ["awgn", "rayleigh"])
def test_sample_reproduces_forward_with_same_seed(kind):
    x = _symbols(8, 16)
    ch = Channel(kind)
    snr = torch.linspace(0, 20, 8)
    seed_channels(13)
    direct = ch(x, snr)
    seed_channels(13)
    via_draw = ch(x, snr, draw=ch.sample(8, 16, snr))
    assert torch.equal(direct, via_draw)


def test_matches_sionna_awgn_block_with_same_seed():
    x = _symbols(8, 128)
    snr = torch.tensor([0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0])
    seed_channels(21)
    ours = Channel("awgn")(x, snr)
    sionna.phy.config.seed = 21
    ref = AWGN(device="cpu")(x, (10 ** (-snr / 10)).unsqueeze(1))
    assert torch.equal(ours, ref)
    seed_channels(21)
    ours_scalar = Channel("awgn")(x, 10.0)
    sionna.phy.config.seed = 21
    assert torch.equal(ours_scalar, AWGN(device="cpu")(x, 0.1))


def test_draws_work_under_vmap():
    U, B, n = 3, 4, 8
    ch = Channel("rayleigh")
    xs = torch.stack([_symbols(B, n, seed=u) for u in range(U)])
    draws = [ch.sample(B, n, torch.tensor([0.0, 5.0, 10.0, 20.0])) for _ in range(U)]
    stacked = ChannelDraw(
        noise=torch.stack([d.noise for d in draws]),
        h=torch.stack([d.h for d in draws]),
        noise_var=torch.stack([d.noise_var for d in draws]),
    )
    out = torch.func.vmap(lambda x, d: ch(x, 0.0, draw=d))(xs, stacked)
    ref = torch.stack([ch(xs[u], 0.0, draw=draws[u]) for u in range(U)])
    torch.testing.assert_close(out, ref)


def test_double_precision_is_kept():
    x = _symbols(4, 16, dtype=torch.complex128)
    for kind in ("awgn", "rayleigh"):
        assert Channel(kind)(x, 10.0).dtype == torch.complex128
        assert Channel(kind).sample(4, 16, 10.0, dtype=torch.complex128).noise.dtype == torch.complex128


def test_kind_validation_and_make_channel():
    with pytest.raises(ValueError, match="rician"):
        Channel("rician")
    ch = make_channel(ChannelConfig(kind="rayleigh", equalize=False))
    assert isinstance(ch, Channel) and ch.kind == "rayleigh" and not ch.equalize
    assert list(ch.parameters()) == []
    with pytest.raises(ValueError, match="h"):
        ch(_symbols(2, 4), 10.0, draw=Channel("awgn").sample(2, 4, 10.0))


# Sionna imported at first use (not with semfl.wireless.channel) without moving torch's random state:
# checked in a fresh process by tests/test_config.py::test_fresh_process_knows_method_tables_on_first_load_and_runs_without_optional_packages


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["awgn", "rayleigh"])
def test_cuda_stays_on_device(kind):
    x = _symbols(16, 64).cuda().requires_grad_(True)
    ch = Channel(kind)
    seed_channels(31)
    y = ch(x, torch.full((16,), 10.0, device="cuda"))
    assert y.device == x.device
    y.abs().sum().backward()
    assert torch.isfinite(torch.view_as_real(x.grad)).all() and x.grad.abs().sum() > 0
    seed_channels(31)
    d = ch.sample(16, 64, torch.full((16,), 10.0), device="cuda")
    assert d.noise.device.type == "cuda"
    assert torch.equal(ch(x, 10.0, draw=d), y)
    n = ch.sample(1000, 1000, 10.0, device=x.device).noise
    assert (n.abs() ** 2).mean().item() == pytest.approx(0.1, rel=0.03)


def test_preserved_rng_leaves_torch_and_sionna_generators_untouched():
    from semfl.wireless.channel import make_channel, preserved_rng
    from semfl.config import ChannelConfig
    from semfl.protocol import seeding

    channel = make_channel(ChannelConfig(kind="awgn"))
    x = torch.ones(4, 16, dtype=torch.complex64)

    def draws():
        return channel(x, 5.0), torch.rand(3)

    seeding.enter(7)
    expected = draws()
    seeding.enter(7)
    with preserved_rng("cpu"):
        channel(x, 0.0), torch.rand(100)  # work that draws from both generators
    got = draws()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
