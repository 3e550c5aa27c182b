import math

import pytest
import torch

from semfl.methods.psfl.privacy import DPConfig, PrivacyAccountant, add_gaussian_noise, clip_update, noise_std, privatize, update_norm

try:
    import dp_accounting
    from dp_accounting import rdp
except ImportError:  # only the accountant tests need it
    dp_accounting = None
needs_dpa = pytest.mark.skipif(dp_accounting is None, reason="dp-accounting not installed")


def make_update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": scale * torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": scale * torch.randn(8, generator=g),
        "fc.weight": scale * torch.randn(10, 32, generator=g),
    }


# ----------------------------------------------------------------------------- clipping
def test_clip_scales_large_update_to_exactly_C():
    upd = make_update(0, scale=5.0)
    norm_before = update_norm(upd)
    assert norm_before > 1.0
    clipped, norm = clip_update(upd, 1.0)
    assert norm == pytest.approx(norm_before)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    # direction preserved, input not modified
    ratio = clipped["fc.weight"] / upd["fc.weight"]
    assert torch.allclose(ratio, torch.full_like(ratio, 1.0 / norm_before), rtol=1e-4)
    assert update_norm(upd) == pytest.approx(norm_before)


def test_clip_leaves_small_update_unchanged():
    upd = make_update(1, scale=1e-3)
    clipped, norm = clip_update(upd, 1.0)
    assert norm < 1.0
    for k in upd:
        assert torch.equal(clipped[k], upd[k])


def test_clip_uses_global_norm_and_skips_int_buffers():
    upd = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0]), "n": torch.tensor(7)}
    clipped, norm = clip_update(upd, 1.0)
    assert norm == pytest.approx(5.0)
    assert clipped["a"].item() == pytest.approx(0.6) and clipped["b"].item() == pytest.approx(0.8)
    assert clipped["n"].item() == 7


# ----------------------------------------------------------------------------- noise
def test_noise_std_and_determinism():
    cfg = DPConfig(enabled=True, clip_norm=0.5, noise_multiplier=1.3)
    std = noise_std(cfg, n_participants=9)
    assert std == pytest.approx(1.3 * 0.5)
    zero = {"w": torch.zeros(200_000), "b": torch.zeros(10)}
    a = add_gaussian_noise(zero, std, torch.Generator().manual_seed(7))
    b = add_gaussian_noise(zero, std, torch.Generator().manual_seed(7))
    c = add_gaussian_noise(zero, std, torch.Generator().manual_seed(8))
    assert abs(a["w"].std().item() - std) / std < 0.05
    assert abs(a["w"].mean().item()) < 0.01
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w"], c["w"])
    assert torch.equal(zero["w"], torch.zeros(200_000))  # input untouched


def test_distributed_mode_sum_has_target_std():
    m = 16
    cfg = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=2.0, mode="distributed")
    std = noise_std(cfg, m)
    assert std == pytest.approx(2.0 / math.sqrt(m))
    g = torch.Generator().manual_seed(0)
    total = sum(add_gaussian_noise({"w": torch.zeros(50_000)}, std, g)["w"] for _ in range(m))
    assert abs(total.std().item() - 2.0) / 2.0 < 0.05


def test_privatize_clips_then_adds_noise_of_std_z_c():
    n = 40_000
    update = {"w": 10.0 * torch.randn(n, generator=torch.Generator().manual_seed(1)), "steps": torch.tensor(7)}
    for mode, std in (("local", 0.5 * 2.0), ("distributed", 0.5 * 2.0 / 2)):  # z = 0.5, C = 2, m = 4
        cfg = DPConfig(enabled=True, clip_norm=2.0, noise_multiplier=0.5, mode=mode)
        out, norm = privatize(update, cfg, 4, torch.Generator().manual_seed(0))
        assert norm == pytest.approx(float(update["w"].double().norm()), rel=1e-9)
        noise = out["w"] - update["w"] * (2.0 / norm)  # what is left once the clipped update is taken away
        # n draws: the sample std is within 2 % (5 sigma: sd sqrt(1 / 2n) = 0.35 %), the mean near 0
        assert float(noise.std()) == pytest.approx(std, rel=0.02) and abs(float(noise.mean())) < 5 * std / n ** 0.5
        assert abs(float(torch.corrcoef(torch.stack([noise, update["w"]]))[0, 1])) < 5 / n ** 0.5
        assert torch.equal(out["steps"], update["steps"])  # integer buffers are not noised
        # clipped first: the norm is sqrt(C^2 + n std^2), not C as noising before clipping would leave
        assert update_norm(out) == pytest.approx(math.sqrt(4 + n * std ** 2), rel=0.02)


def test_privatize_clips_then_noises_and_bad_mode_rejected():
    cfg = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=0.0)
    out, norm = privatize(make_update(2, 10.0), cfg, 3, torch.Generator().manual_seed(0))
    assert norm > 1.0 and update_norm(out) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="mode"):
        DPConfig(mode="central")


# ----------------------------------------------------------------------------- accountant
def direct_epsilon(z, q, steps, delta):
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


@needs_dpa
def test_accountant_matches_dp_accounting():
    acc = PrivacyAccountant(noise_multiplier=1.1, delta=1e-5, sampling_prob=0.01)
    assert acc.epsilon() == 0.0
    acc.step(100)
    acc.step()
    assert acc.epsilon() == pytest.approx(direct_epsilon(1.1, 0.01, 101, 1e-5), rel=1e-9)
    # full participation (PSFL: all 9 users every round)
    full = PrivacyAccountant(1.0, 1e-5, 1.0)
    full.step(10)
    assert full.epsilon() == pytest.approx(direct_epsilon(1.0, 1.0, 10, 1e-5), rel=1e-9)


@needs_dpa
def test_accountant_monotonicity():
    eps = []
    acc = PrivacyAccountant(1.0, 1e-5, 0.1)
    for _ in range(4):
        acc.step(5)
        eps.append(acc.epsilon())
    assert all(b > a for a, b in zip(eps, eps[1:]))
    more_noise = PrivacyAccountant(2.0, 1e-5, 0.1)
    more_noise.step(20)
    assert more_noise.epsilon() < eps[-1]
    tighter_delta = PrivacyAccountant(1.0, 1e-7, 0.1)
    tighter_delta.step(20)
    assert tighter_delta.epsilon() > eps[-1]


@needs_dpa
def test_accountant_state_dict_round_trip():
    acc = PrivacyAccountant(1.2, 1e-5, 0.2)
    acc.step(37)
    state = acc.state_dict()
    resumed = PrivacyAccountant.from_config(DPConfig(noise_multiplier=1.2, delta=1e-5), 0.2)
    resumed.load_state_dict(state)
    assert resumed.steps == 37 and resumed.epsilon() == acc.epsilon()
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyAccountant(0.8, 1e-5, 0.2).load_state_dict(state)
