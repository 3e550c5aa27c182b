"""PSFL's Adaptive Global Pruning (AGP): eq 26 and the mask update of Algorithm 2.

* :func:`prune_ratio` -- eq 26, ``zeta_t = (psi_max - mean_k psi_{k,t}) / (psi_max - psi_min)``
  with SNRs in dB, clipped to ``[0, zeta_max]`` (seeds/README: the raw value reaches 1 = prune
  everything when every user sits at psi_min; ``zeta_max`` defaults to 0.9). Both the clipped
  and the raw value are returned so the caller can record them.
* :func:`magnitude_masks` -- prune exactly ``round(zeta * n)`` of the smallest-|w| entries ("the
  smallest positive and the largest negative weights"), globally over all prunable tensors or
  per tensor. Ties are broken deterministically: a stable sort of |w| over the tensors
  flattened and concatenated in dict order, so among equal magnitudes the earlier position is
  pruned first.
* :func:`update_masks` -- the round-to-round update, in the **consistent direction** (seeds/README;
  the paper's text around eq 27 has it reversed): zeta is the pruned fraction, so a *larger*
  zeta prunes more (already-pruned positions stay pruned, the smallest surviving weights join
  them) and a *smaller* zeta regrows ("add weights randomly"): randomly chosen pruned positions
  (drawn with the caller's generator) are re-enabled until exactly ``round(zeta * n)`` remain
  pruned. Regrown positions keep the value the weights hold there, which is 0 in the protocol
  (the students keep the mask fixed during local training, so the aggregate is 0 at every pruned
  position); they then train from 0.

``round`` is Python's ``round`` (ties to even) of ``zeta * n``; ``n`` is the number of prunable
entries (global scope) or of the tensor's entries (layer scope).

Prunable tensors (:func:`prunable`): floating-point weights with ``dim >= 2`` (conv and linear
weights). Biases, norm parameters and PReLU slopes (1-D), and tokens / position embeddings
(``cls_token``, ``mask_token``, ``pos_embed``, ...) are exempt.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

Scope = Literal["global", "layer"]
_EXEMPT_MARKERS = ("token", "pos_embed", "position")  # matched in the last name component


def prune_ratio(snrs_db: Sequence[float], snr_min_db: float, snr_max_db: float,
                zeta_max: float = 0.9) -> tuple[float, float]:
    """Eq 26 on the users' SNRs of the round (dB). Returns ``(clipped to [0, zeta_max], raw)``."""
    snrs = [float(s) for s in snrs_db]
    if not snrs:
        raise ValueError("prune_ratio: snrs_db is empty (need the SNR of at least one user)")
    if not 0.0 <= zeta_max <= 1.0:
        raise ValueError(f"prune_ratio: zeta_max must be in [0, 1], got {zeta_max}")
    if snr_max_db == snr_min_db:
        raise ValueError(f"prune_ratio: psi_max (snr_max_db={snr_max_db}) equals psi_min "
                         f"(snr_min_db={snr_min_db}); eq 26 divides by psi_max - psi_min")
    raw = (snr_max_db - sum(snrs) / len(snrs)) / (snr_max_db - snr_min_db)
    return min(max(raw, 0.0), zeta_max), raw


def prunable(name: str, tensor: torch.Tensor) -> bool:
    """Conv / linear weights (floating point, dim >= 2).

    Exempt: biases, norm weights and PReLU slopes (all 1-D), and tokens / position tables
    (``cls_token``, ``mask_token``, ``pos_embed``, ``decoder_pos_embed``: matched by name).
    """
    if not torch.is_tensor(tensor) or not tensor.is_floating_point() or tensor.dim() < 2:
        return False
    leaf = name.rsplit(".", 1)[-1].lower()
    if any(marker in leaf for marker in _EXEMPT_MARKERS):
        return False
    return not leaf.endswith("bias")


def _target(ratio: float, n: int) -> int:
    return int(round(ratio * n))


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"pruning ratio must be in [0, 1], got {ratio}")


def _groups(weights: dict[str, torch.Tensor], scope: Scope) -> list[list[str]]:
    names = [k for k, v in weights.items() if prunable(k, v)]
    if scope == "global":
        return [names] if names else []
    if scope == "layer":
        return [[k] for k in names]
    raise ValueError(f"pruning scope must be 'global' or 'layer', got {scope!r}")


def _flat_abs(weights: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([weights[k].detach().reshape(-1).abs().to(torch.float64) for k in names])


def _split(flat_keep: torch.Tensor, weights: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for k in names:
        w = weights[k]
        out[k] = flat_keep[start:start + w.numel()].reshape(w.shape).to(dtype=w.dtype, device=w.device)
        start += w.numel()
    return out


def _prune_smallest(key: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-vector (bool) with the ``count`` smallest keys pruned; stable sort breaks ties by index."""
    keep = torch.ones_like(key, dtype=torch.bool)
    if count > 0:
        order = torch.sort(key, stable=True).indices
        keep[order[:count]] = False
    return keep


def magnitude_masks(weights: dict[str, torch.Tensor], ratio: float, scope: Scope = "global") -> dict[str, torch.Tensor]:
    """0/1 masks (dtype of the weights) for the prunable tensors, ``round(ratio * n)`` entries pruned."""
    _check_ratio(ratio)
    masks: dict[str, torch.Tensor] = {}
    for names in _groups(weights, scope):
        key = _flat_abs(weights, names)
        masks.update(_split(_prune_smallest(key, _target(ratio, key.numel())), weights, names))
    return masks


def update_masks(weights: dict[str, torch.Tensor], old_masks: dict[str, torch.Tensor] | None, ratio: float,
                 scope: Scope, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Algorithm 2's mask update (consistent direction: larger ratio prunes more, smaller regrows).

    Per group (all prunable tensors for ``scope='global'``, each tensor for ``'layer'``), with
    ``p`` positions pruned by ``old_masks`` (a prunable tensor missing from it counts as unpruned)
    and target ``t = round(ratio * n)``: if ``t >= p`` the old pruned positions stay pruned and
    the ``t - p`` smallest-|w| surviving entries are added; if ``t < p``, ``p - t`` pruned
    positions chosen uniformly at random with ``generator`` are regrown. Without old masks this
    is :func:`magnitude_masks`. The weights are not modified.

    Returns ``(masks, info)``, info = ``{'pruned', 'total', 'ratio', 'regrown', 'newly_pruned'}``.
    """
    _check_ratio(ratio)
    old_masks = old_masks or {}
    masks: dict[str, torch.Tensor] = {}
    pruned_total = total = regrown = newly = 0
    for names in _groups(weights, scope):
        key = _flat_abs(weights, names)
        old_keep = torch.cat([
            (old_masks[k].detach().reshape(-1).to(key.device) != 0) if k in old_masks
            else torch.ones(weights[k].numel(), dtype=torch.bool, device=key.device)
            for k in names])
        n = key.numel()
        target = _target(ratio, n)
        already = int((~old_keep).sum())
        if target >= already:
            # old pruned positions sort first (key -1 < any |w|), then the smallest survivors
            keep = _prune_smallest(torch.where(old_keep, key, torch.full_like(key, -1.0)), target)
            newly += target - already
        else:
            keep = old_keep.clone()
            pruned_idx = torch.nonzero(~old_keep).reshape(-1)
            perm = torch.randperm(len(pruned_idx), generator=generator, device=generator.device).to(key.device)
            keep[pruned_idx[perm[:already - target]]] = True
            regrown += already - target
        masks.update(_split(keep, weights, names))
        pruned_total += n - int(keep.sum())
        total += n
    info = {"pruned": pruned_total, "total": total, "ratio": pruned_total / total if total else 0.0,
            "regrown": regrown, "newly_pruned": newly}
    return masks, info


def apply(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """New dict: masked tensors multiplied by their mask, the others passed through unchanged."""
    masks = masks or {}
    return {k: (v * masks[k].to(device=v.device, dtype=v.dtype)) if k in masks else v for k, v in weights.items()}


def sparsity(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> float:
    """Fraction of zero entries over the prunable tensors (after applying ``masks`` if given)."""
    masked = apply(weights, masks)
    zeros = total = 0
    for k, v in masked.items():
        if prunable(k, v):
            zeros += int((v == 0).sum())
            total += v.numel()
    return zeros / total if total else 0.0
