"""AGP (PSFL eq 26, Algorithm 2): pruning ratio, magnitude masks, prune-more / regrow updates."""
from __future__ import annotations

import pytest
import torch

from semfl.wireless.codecs import get_codec
from semfl.methods.psfl.agp import apply, magnitude_masks, prunable, prune_ratio, sparsity, update_masks


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(6, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(6, generator=g),
        "bn.weight": torch.rand(6, generator=g) + 0.5,
        "bn.bias": torch.randn(6, generator=g),
        "fc.weight": torch.randn(10, 7, generator=g) * 3.0,
        "fc.bias": torch.randn(10, generator=g),
        "act.weight": torch.full((1,), 0.25),  # PReLU slope
        "cls_token": torch.randn(1, 1, 8, generator=g),
        "mask_token": torch.randn(1, 1, 8, generator=g),
        "pos_embed": torch.randn(1, 5, 8, generator=g),
    }


PRUNABLE = ("conv.weight", "fc.weight")


def _n_prunable(w):
    return sum(w[k].numel() for k in PRUNABLE)


def _pruned(masks) -> int:
    return sum(int((m == 0).sum()) for m in masks.values())


def _pruned_set(masks) -> set[tuple[str, int]]:
    return {(k, int(i)) for k, m in masks.items() for i in torch.nonzero(m.reshape(-1) == 0).reshape(-1)}


# ---------------------------------------------------------------- eq 26

def test_prune_ratio_hand_values():
    z, raw = prune_ratio([12.5], 0.0, 25.0)
    assert z == pytest.approx(0.5) and raw == pytest.approx(0.5)
    z, raw = prune_ratio([0.0, 25.0, 5.0, 20.0], 0.0, 25.0)  # mean 12.5
    assert z == pytest.approx(0.5) and raw == pytest.approx(0.5)
    z, raw = prune_ratio([0.0, 0.0, 0.0], 0.0, 25.0)
    assert raw == pytest.approx(1.0) and z == pytest.approx(0.9)
    z, raw = prune_ratio([25.0, 25.0], 0.0, 25.0)
    assert z == 0.0 and raw == 0.0
    z, raw = prune_ratio([30.0], 0.0, 25.0)  # above psi_max -> raw negative, clipped to 0
    assert raw == pytest.approx(-0.2) and z == 0.0
    assert prune_ratio([0.0], 0.0, 25.0, zeta_max=0.7)[0] == pytest.approx(0.7)
    assert prune_ratio([20.0], 0.0, 25.0)[0] == pytest.approx(0.2)


def test_prune_ratio_degenerate_range():
    with pytest.raises(ValueError, match="psi_max"):
        prune_ratio([10.0], 10.0, 10.0)
    with pytest.raises(ValueError):
        prune_ratio([], 0.0, 25.0)


# ---------------------------------------------------------------- which tensors

def test_prunable_names():
    w = _weights()
    assert {k for k, v in w.items() if prunable(k, v)} == set(PRUNABLE)
    assert prunable("blocks.0.attn.qkv.weight", torch.zeros(6, 2))
    assert not prunable("decoder_pos_embed", torch.zeros(1, 5, 8))
    assert not prunable("blocks.0.norm1.weight", torch.zeros(8))
    assert not prunable("conv.weight", torch.zeros(4, 4, dtype=torch.int64))


# ---------------------------------------------------------------- magnitude masks

@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.77, 0.9, 1.0])
def test_global_masks_exact_count_and_smallest(ratio):
    w = _weights()
    masks = magnitude_masks(w, ratio, "global")
    assert set(masks) == set(PRUNABLE)
    n = _n_prunable(w)
    assert _pruned(masks) == round(ratio * n)
    for k, m in masks.items():
        assert m.dtype == w[k].dtype and m.shape == w[k].shape
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    pruned = torch.cat([w[k][masks[k] == 0].abs() for k in PRUNABLE])
    kept = torch.cat([w[k][masks[k] == 1].abs() for k in PRUNABLE])
    if len(pruned) and len(kept):
        assert pruned.max() <= kept.min()
    if 0 < ratio < 1:  # fc weights are 3x larger: global pruning hits conv harder
        frac = {k: float((masks[k] == 0).float().mean()) for k in PRUNABLE}
        assert frac["conv.weight"] > frac["fc.weight"]


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.6, 0.9])
def test_layer_masks_exact_count_per_tensor(ratio):
    w = _weights()
    masks = magnitude_masks(w, ratio, "layer")
    for k in PRUNABLE:
        m = masks[k]
        assert int((m == 0).sum()) == round(ratio * w[k].numel())
        pruned, kept = w[k][m == 0].abs(), w[k][m == 1].abs()
        if len(pruned) and len(kept):
            assert pruned.max() <= kept.min()


def test_ties_deterministic():
    w = {"a.weight": torch.ones(4, 5), "b.weight": torch.ones(3, 3)}
    m1 = magnitude_masks(w, 0.5, "global")
    m2 = magnitude_masks(w, 0.5, "global")
    assert all(torch.equal(m1[k], m2[k]) for k in w)
    assert _pruned(m1) == round(0.5 * 29)
    # stable sort: the earliest positions (dict order, then flat index) go first
    assert int((m1["a.weight"] == 0).sum()) == 14 and int((m1["b.weight"] == 0).sum()) == 0
    assert torch.all(m1["a.weight"].reshape(-1)[:14] == 0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        magnitude_masks(_weights(), 1.5)
    with pytest.raises(ValueError):
        magnitude_masks(_weights(), 0.5, "row")


# ---------------------------------------------------------------- apply / sparsity / untouched

def test_apply_zeroes_exactly_masked_entries_and_leaves_others():
    w = _weights()
    masks = magnitude_masks(w, 0.4)
    out = apply(w, masks)
    assert set(out) == set(w)
    for k, v in w.items():
        if k in masks:
            assert torch.equal(out[k] == 0, masks[k] == 0)  # randn weights have no natural zeros
            assert torch.equal(out[k][masks[k] == 1], v[masks[k] == 1])
        else:
            assert out[k] is v  # biases, norms, tokens untouched
    assert w["conv.weight"].count_nonzero() == w["conv.weight"].numel()  # input not modified
    assert sparsity(w) == 0.0
    assert sparsity(w, masks) == pytest.approx(round(0.4 * _n_prunable(w)) / _n_prunable(w))
    assert sparsity(out) == sparsity(w, masks)


# ---------------------------------------------------------------- Algorithm 2 updates

@pytest.mark.parametrize("scope", ["global", "layer"])
def test_update_without_old_masks_is_magnitude(scope):
    w = _weights()
    masks, info = update_masks(w, None, 0.35, scope, torch.Generator().manual_seed(0))
    ref = magnitude_masks(w, 0.35, scope)
    assert all(torch.equal(masks[k], ref[k]) for k in PRUNABLE)
    assert info["total"] == _n_prunable(w) and info["pruned"] == _pruned(ref)
    assert info["newly_pruned"] == info["pruned"] and info["regrown"] == 0
    assert info["ratio"] == pytest.approx(info["pruned"] / info["total"])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_increasing_ratio_keeps_old_pruned_set(scope):
    g = torch.Generator().manual_seed(0)
    w = _weights(1)
    m1, _ = update_masks(w, None, 0.3, scope, g)
    # weights move between rounds (training); the old pruned positions get the largest magnitudes,
    # so plain magnitude pruning of w2 would keep them: they must stay pruned all the same
    w2 = {k: v + 0.5 * torch.randn_like(v) for k, v in _weights(2).items()}
    w2.update({k: torch.where(m1[k] == 0, torch.full_like(w2[k], 100.0), w2[k]) for k in PRUNABLE})
    m2, info = update_masks(w2, m1, 0.6, scope, g)
    assert _pruned_set(m1) < _pruned_set(m2)
    n = _n_prunable(w)
    if scope == "global":
        assert info["pruned"] == round(0.6 * n)
        assert info["newly_pruned"] == round(0.6 * n) - round(0.3 * n)
        # the newly pruned are the smallest surviving magnitudes
        new = _pruned_set(m2) - _pruned_set(m1)
        new_abs = torch.tensor([float(w2[k].reshape(-1)[i].abs()) for k, i in new])
        kept = torch.cat([w2[k][m2[k] == 1].abs() for k in PRUNABLE])
        assert new_abs.max() <= kept.min()
    else:
        for k in PRUNABLE:
            assert int((m2[k] == 0).sum()) == round(0.6 * w[k].numel())
    assert info["regrown"] == 0


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_decreasing_ratio_regrows_exact_count_deterministically(scope):
    w = _weights(3)
    m_hi, _ = update_masks(w, None, 0.8, scope, torch.Generator().manual_seed(0))
    w_hi = apply(w, m_hi)
    m_lo, info = update_masks(w_hi, m_hi, 0.25, scope, torch.Generator().manual_seed(7))
    n = _n_prunable(w)
    if scope == "global":
        assert info["pruned"] == round(0.25 * n)
        assert info["regrown"] == round(0.8 * n) - round(0.25 * n)
    else:
        for k in PRUNABLE:
            assert int((m_lo[k] == 0).sum()) == round(0.25 * w[k].numel())
        assert info["regrown"] == sum(round(0.8 * w[k].numel()) - round(0.25 * w[k].numel()) for k in PRUNABLE)
    assert info["newly_pruned"] == 0
    # regrown positions were pruned before; nothing new is pruned
    assert _pruned_set(m_lo) < _pruned_set(m_hi)
    assert len(_pruned_set(m_hi) - _pruned_set(m_lo)) == info["regrown"]
    # same generator seed -> same regrown set; different seed -> (almost surely) different
    m_again, _ = update_masks(w_hi, m_hi, 0.25, scope, torch.Generator().manual_seed(7))
    assert all(torch.equal(m_lo[k], m_again[k]) for k in PRUNABLE)
    m_other, _ = update_masks(w_hi, m_hi, 0.25, scope, torch.Generator().manual_seed(8))
    assert any(not torch.equal(m_lo[k], m_other[k]) for k in PRUNABLE)


def test_equal_ratio_is_a_no_op():
    w = _weights()
    m1, _ = update_masks(w, None, 0.5, "global", torch.Generator().manual_seed(0))
    # other weights, the pruned positions the largest: magnitude pruning alone would pick another set
    w2 = {k: torch.where(m1[k] == 0, torch.full_like(v, 100.0), v) if k in PRUNABLE else v
          for k, v in _weights(5).items()}
    assert any(not torch.equal(m1[k], magnitude_masks(w2, 0.5)[k]) for k in PRUNABLE)
    m2, info = update_masks(w2, m1, 0.5, "global", torch.Generator().manual_seed(0))
    assert all(torch.equal(m1[k], m2[k]) for k in PRUNABLE)
    assert info["regrown"] == 0 and info["newly_pruned"] == 0


# ---------------------------------------------------------------- bits fall as zeta rises

def test_sparse_bits_fall_as_ratio_rises():
    w = _weights()
    codec = get_codec("sparse")
    bits = [codec.bits(apply(w, magnitude_masks(w, z))) for z in (0.0, 0.3, 0.6, 0.9)]
    assert all(a > b for a, b in zip(bits, bits[1:])), bits


# ---------------------------------------------------------------- the base station's regrowth (PSFL._prune)

def _base_station(snrs_of_round: dict[int, list[float]], weights: dict[str, torch.Tensor], seed: int = 0):
    """PSFL's base-station state for :meth:`PSFL._prune` alone: config, options, the users' link
    SNRs per round and the global weights (no users, models or transport are needed)."""
    from types import SimpleNamespace

    from semfl.config import load_config
    from semfl.methods.psfl.psfl import PSFL

    station = PSFL.__new__(PSFL)
    station.cfg = load_config(None, ["method=psfl", f"seed={seed}"])
    station.options = station.cfg.table("psfl")
    station.run = SimpleNamespace(link=SimpleNamespace(snrs_db=lambda round_: snrs_of_round[round_]))
    station.global_weights, station.masks = weights, None
    return station


def test_regrown_weights_restart_at_the_smallest_kept_magnitude_with_seeded_signs():
    rounds = {1: [0.0, 2.5], 2: [20.0, 25.0]}  # eq 26: zeta 0.9 (clipped), then 0.1: regrowth
    station = _base_station(rounds, _weights(4))
    assert station._prune(1)["prune_ratio"] == pytest.approx(0.9, abs=0.01)
    before, old = {k: v.clone() for k, v in station.global_weights.items()}, station.masks
    info = station._prune(2)
    assert info["regrown"] == round(0.9 * _n_prunable(before)) - round(0.1 * _n_prunable(before))
    grown_total, signs, seen = 0, [], set()
    for k in PRUNABLE:
        grown = (station.masks[k] > 0) & (old[k] == 0)
        kept = station.global_weights[k][(station.masks[k] > 0) & ~grown].abs()
        values = station.global_weights[k][grown]
        # ±(the smallest kept |w| of the tensor); 1e-3 where the whole tensor was pruned (conv here)
        scale = float(kept.min()) if kept.numel() else 1e-3
        assert scale > 0 and torch.equal(values.abs(), torch.full_like(values, scale))
        empty_tensors = kept.numel() == 0
        assert torch.equal(station.global_weights[k][~grown & (station.masks[k] > 0)], before[k][~grown & (old[k] > 0)])
        grown_total += int(grown.sum())
        signs.append(torch.sign(values))
        seen.add(empty_tensors)
    assert seen == {True, False}  # both cases met: a tensor with weights kept, one pruned whole
    assert grown_total == info["regrown"]
    signs = torch.cat(signs)
    assert (signs > 0).any() and (signs < 0).any()  # random signs, not one sign for all
    # the same seed and round give the same regrowth; another seed another one
    for seed, same in ((0, True), (1, False)):
        again = _base_station(rounds, _weights(4), seed)
        again._prune(1)
        again._prune(2)
        assert all(torch.equal(again.global_weights[k], station.global_weights[k]) for k in PRUNABLE) == same
