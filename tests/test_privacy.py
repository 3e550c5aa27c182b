import math

import pytest
import torch

from semfl.methods.psfl.privacy import DPConfig, MaskedUpdate, PrivacyAccountant, SecAggConfig, add_gaussian_noise, clip_update, mask_update, masked_bits, noise_std, privatize, secure_aggregate, unmask_sum, update_norm

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


# ----------------------------------------------------------------------------- secure aggregation
USERS = [0, 2, 3, 5, 8]


def plain_sum(updates):
    return {k: sum(u[k].double() for u in updates) for k in updates[0]}


def test_masked_sum_equals_plain_sum():
    f = SecAggConfig().frac_bits
    updates = [make_update(10 + u) for u in USERS]
    masked = [mask_update(upd, u, USERS, round_seed=1234, frac_bits=f) for u, upd in zip(USERS, updates)]
    assert all(m[k].dtype == torch.int64 for m in masked for k in m)
    exact = plain_sum(updates)
    got64 = unmask_sum(masked, f, dtype=torch.float64)
    got32 = unmask_sum(masked, f)
    for k in exact:
        assert (got64[k] - exact[k]).abs().max().item() <= len(USERS) * 2.0**-f
        assert got32[k].dtype == torch.float32
        assert torch.allclose(got32[k].double(), exact[k], atol=len(USERS) * 2.0**-f, rtol=1e-6)
    # order of arrival does not matter
    rev = unmask_sum(masked[::-1], f, dtype=torch.float64)
    assert all(torch.equal(rev[k], got64[k]) for k in rev)


def test_single_masked_update_looks_random():
    f = 16
    updates = [make_update(20 + u) for u in USERS]
    for u, upd in zip(USERS, updates):
        m = mask_update(upd, u, USERS, round_seed=99, frac_bits=f)
        plain = torch.cat([upd[k].reshape(-1).double() for k in sorted(upd)])
        decoded = torch.cat([m[k].reshape(-1).double() / 2.0**f for k in sorted(m)])
        corr = torch.corrcoef(torch.stack([plain, decoded]))[0, 1].abs().item()
        assert corr < 0.1
        assert (decoded - plain).abs().median().item() > 1e6  # masks span the whole ring


def test_masking_is_deterministic_given_round_seed():
    upd = make_update(3)
    a = mask_update(upd, 2, USERS, round_seed=5, frac_bits=16)
    b = mask_update(upd, 2, USERS, round_seed=5, frac_bits=16)
    c = mask_update(upd, 2, USERS, round_seed=6, frac_bits=16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_missing_participant_raises():
    f = 16
    masked = [mask_update(make_update(u), u, USERS, round_seed=1, frac_bits=f) for u in USERS]
    with pytest.raises(RuntimeError, match=r"participants \[3\].*cannot be unmasked"):
        unmask_sum([m for m in masked if m.user != 3], f)
    with pytest.raises(ValueError, match="duplicate"):
        unmask_sum(masked + masked[:1], f)
    with pytest.raises(ValueError, match="frac_bits"):
        unmask_sum(masked, f + 1)
    with pytest.raises(ValueError, match="participants"):
        mask_update(make_update(0), 4, USERS, round_seed=1, frac_bits=f)
    assert isinstance(masked[0], MaskedUpdate)


def test_overflow_is_reported():
    with pytest.raises(OverflowError, match="frac_bits"):
        mask_update({"w": torch.tensor([1e12])}, 0, [0, 1], round_seed=0, frac_bits=24)
    for bad in (float("nan"), float("inf")):  # NaN compares False with any limit: checked on its own
        with pytest.raises(ValueError, match="NaN or infinite"):
            mask_update({"w": torch.tensor([bad, 1.0])}, 0, [0, 1], round_seed=0, frac_bits=24)


def test_weighted_average_equals_plain_weighted_average():
    sizes = {0: 1854, 2: 3000, 3: 4500, 5: 7000, 8: 9281}
    total = sum(sizes.values())
    weights = {k: n / total for k, n in sizes.items()}
    updates = {u: make_update(30 + u) for u in USERS}
    got = secure_aggregate(updates, round_seed=77, frac_bits=24, weights=weights, dtype=torch.float64)
    for k in updates[0]:
        expect = sum(weights[u] * updates[u][k].double() for u in USERS)
        assert (got[k] - expect).abs().max().item() <= len(USERS) * 2.0**-24


def test_masked_bits_is_64_per_entry():
    upd = make_update(0)
    n = sum(v.numel() for v in upd.values())
    assert masked_bits(upd) == 64 * n
    assert masked_bits(mask_update(upd, 0, [0, 1], 0, 16)) == 64 * n


def test_dp_then_secagg_pipeline():
    """Users clip+noise (distributed mode), mask; the BS recovers exactly the noisy sum."""
    cfg = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1.0, mode="distributed")
    g = torch.Generator().manual_seed(0)
    noisy = {u: privatize(make_update(u, 3.0), cfg, len(USERS), g)[0] for u in USERS}
    got = secure_aggregate(noisy, round_seed=3, frac_bits=24, dtype=torch.float64)
    expect = plain_sum([noisy[u] for u in USERS])
    assert all(torch.allclose(got[k], expect[k], atol=1e-5) for k in got)
