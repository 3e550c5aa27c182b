"""Privacy for PSFL uploads (PSFL Section II-B): user-level (ε, δ)-DP and secure aggregation.

**Differential privacy** (DP-FedAvg style, McMahan et al. 2018). Each user clips its update
Δ_k to global L2 norm C and adds Gaussian noise *before* masking/encryption, as the paper says
("adding calibrated Gaussian noise to the gradients before encryption"). ``DPConfig.mode``:

* ``'local'`` (default): every user adds N(0, (zC)²). Each upload is noisy on its own, so it
  is protected even without secure aggregation; the sum carries std zC·√m.
* ``'distributed'``: every user adds N(0, (zC)²/m), so the *sum* of the m uploads carries
  exactly N(0, (zC)²). Individual uploads are weakly noisy: private only under secure
  aggregation and only if all m users add their share.

Accounting (:class:`PrivacyAccountant`, which wraps ``dp_accounting``'s RDP accountant): the
released object is the per-round aggregate; neighbouring = add/remove one user (contribution
≤ C). Both modes are accounted with the noise multiplier z: exact for 'distributed', an upper
bound for 'local' (its aggregate has z·√m). ``sampling_prob`` is the per-round probability that
a user takes part under *Poisson* sampling. semfl's runs draw a fixed number of participants
(``train.participation``), which is not Poisson sampling, so PSFL accounts every round with
q = 1: since the draw does not depend on the data, each round is then bounded by the Gaussian
mechanism itself, and no amplification by sampling is claimed. ε covers the privatised update
only; under DP a PSFL user's reply therefore carries nothing else about its data (no training
losses, no test metrics, no update norm). The accounting is for the
*unweighted* sum Σ_k clip(Δ_k) + noise; dividing by the public number of participants is
post-processing. Data-size weights N_k/ΣN make N_k public and are not covered by ε; PSFL keeps
them under DP (each clipped update is scaled by at most 1, so the sum's noise multiplier stays
at least z), as README says.

**Secure aggregation** (pairwise additive masking, Bonawitz et al. 2017, simplified). Threat
model: honest-but-curious base station, no collusion between BS and users, every participant
responds (no dropout recovery: a missing participant makes the round's sum impossible to
unmask and :func:`unmask_sum` raises). Updates are encoded to fixed point
round(x·2^frac_bits) in the ring Z/2^64 (int64 with wrap-around); user i adds +m_ij for every
j > i and −m_ij for every j < i, with m_ij uniform over the ring, expanded from a pair seed
s_ij. The masks cancel exactly in the sum, so the BS learns Σ_k Δ_k and nothing else about a
single Δ_k. Here s_ij is derived deterministically from (round_seed, i, j) to simulate the key
agreement; a real deployment derives s_ij with Diffie–Hellman so the BS cannot know it.
Masking hides individual updates, not the aggregate: DP protects the aggregate. For the
weighted average (PSFL (10)) users pre-multiply Δ_k by N_k/ΣN before masking
(:func:`secure_aggregate` does it). Masked tensors are returned on the CPU.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Update = dict[str, Tensor]


# ----------------------------------------------------------------------------- differential privacy
@dataclass
class DPConfig:
    enabled: bool = False
    clip_norm: float = 1.0  # C
    noise_multiplier: float = 1.0  # z
    delta: float = 1e-5
    mode: Literal["local", "distributed"] = "local"

    def __post_init__(self) -> None:
        if self.mode not in ("local", "distributed"):
            raise ValueError(f"mode: expected 'local' or 'distributed', got {self.mode!r}")
        if self.clip_norm <= 0 or self.noise_multiplier < 0 or not 0 < self.delta < 1:
            raise ValueError("clip_norm must be > 0, noise_multiplier >= 0 and 0 < delta < 1")


def _floating(update: Update) -> list[str]:
    """Keys of the floating-point tensors in sorted order (integer buffers are left alone)."""
    return sorted(k for k, v in update.items() if v.is_floating_point())


def update_norm(update: Update) -> float:
    """Global L2 norm over all floating-point tensors of ``update``."""
    sq = sum(float(update[k].detach().double().pow(2).sum()) for k in _floating(update))
    return math.sqrt(sq)


def clip_update(update: Update, clip_norm: float) -> tuple[Update, float]:
    """Scale the whole update by min(1, C/‖Δ‖₂) (global norm); returns (clipped, original norm).

    Non-floating tensors (e.g. BatchNorm's ``num_batches_tracked``) are copied unchanged.
    """
    norm = update_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: (v * scale if v.is_floating_point() else v.clone()) for k, v in update.items()}, norm


def noise_std(cfg: DPConfig, n_participants: int) -> float:
    """Per-user Gaussian std: zC ('local') or zC/√m ('distributed', so the sum has std zC)."""
    std = cfg.noise_multiplier * cfg.clip_norm
    return std if cfg.mode == "local" else std / math.sqrt(n_participants)


def add_gaussian_noise(update: Update, std: float, generator: torch.Generator) -> Update:
    """Add i.i.d. N(0, std²) to every floating tensor (keys in sorted order, so the noise does
    not depend on dict order). Noise is drawn on ``generator``'s device, then moved."""
    out = {k: v.clone() for k, v in update.items()}
    for k in _floating(update):
        v = update[k]
        dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        noise = torch.randn(v.shape, generator=generator, device=generator.device, dtype=dtype)
        out[k] = v + (std * noise).to(device=v.device, dtype=v.dtype)
    return out


def privatize(update: Update, cfg: DPConfig, n_participants: int,
              generator: torch.Generator) -> tuple[Update, float]:
    """Clip then noise one user's update per ``cfg``; returns (private update, original norm)."""
    clipped, norm = clip_update(update, cfg.clip_norm)
    return add_gaussian_noise(clipped, noise_std(cfg, n_participants), generator), norm


class PrivacyAccountant:
    """User-level (ε, δ) for rounds of PoissonSampled(q, Gaussian(z)) via ``dp_accounting`` RDP.

    The state is the number of rounds only, so a resumed run reports the same ε.
    """

    def __init__(self, noise_multiplier: float, delta: float, sampling_prob: float = 1.0):
        if not 0 < sampling_prob <= 1:
            raise ValueError(f"sampling_prob must be in (0, 1], got {sampling_prob}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.sampling_prob = float(sampling_prob)
        self.steps = 0
        self._cache: tuple[int, float] | None = None

    @classmethod
    def from_config(cls, cfg: DPConfig, sampling_prob: float = 1.0) -> "PrivacyAccountant":
        return cls(cfg.noise_multiplier, cfg.delta, sampling_prob)

    def event(self):
        """The ``dp_accounting`` event of one round."""
        import dp_accounting

        return dp_accounting.PoissonSampledDpEvent(
            self.sampling_prob, dp_accounting.GaussianDpEvent(self.noise_multiplier))

    def step(self, rounds: int = 1) -> None:
        if rounds < 0:
            raise ValueError("rounds must be >= 0")
        self.steps += int(rounds)

    def epsilon(self) -> float:
        if self.steps == 0:
            return 0.0
        if self._cache is None or self._cache[0] != self.steps:
            from dp_accounting import rdp

            acc = rdp.RdpAccountant()
            acc.compose(self.event(), self.steps)
            absl_log = logging.getLogger("absl")  # silence per-order convergence warnings
            level = absl_log.level
            absl_log.setLevel(logging.ERROR)
            try:
                self._cache = (self.steps, float(acc.get_epsilon(self.delta)))
            finally:
                absl_log.setLevel(level)
        return self._cache[1]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "noise_multiplier": self.noise_multiplier,
                "delta": self.delta, "sampling_prob": self.sampling_prob}

    def load_state_dict(self, state: dict) -> None:
        for key in ("noise_multiplier", "delta", "sampling_prob"):
            if key in state and not math.isclose(state[key], getattr(self, key)):
                raise ValueError(f"accountant {key} differs: saved {state[key]}, now {getattr(self, key)}")
        self.steps = int(state["steps"])


# ----------------------------------------------------------------------------- secure aggregation
@dataclass
class SecAggConfig:
    enabled: bool = False
    frac_bits: int = 24


class MaskedUpdate(dict):
    """int64 masked fixed-point tensors plus who sent them (so unmasking can detect dropouts)."""

    def __init__(self, tensors: Update, user: int, participants: tuple[int, ...],
                 round_seed: int, frac_bits: int):
        super().__init__(tensors)
        self.user, self.participants = user, participants
        self.round_seed, self.frac_bits = round_seed, frac_bits


def _pair_mask(round_seed: int, i: int, j: int, n: int) -> np.ndarray:
    """m_ij: n uniform elements of Z/2^64 from the pair seed s_ij = (round_seed, min, max)."""
    rng = np.random.default_rng([round_seed % 2**64, min(i, j), max(i, j)])
    return rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)


def mask_update(update: Update, user: int, participants: list[int], round_seed: int,
                frac_bits: int) -> MaskedUpdate:
    """Fixed-point encode ``update`` and add the pairwise masks of ``user`` (see module doc)."""
    parts = tuple(sorted(participants))
    if len(set(parts)) != len(parts) or user not in parts or min(parts) < 0:
        raise ValueError(f"user {user} must be one of the distinct, non-negative participants {parts}")
    keys = sorted(update)
    flat = torch.cat([update[k].detach().reshape(-1).cpu().double() for k in keys])
    fixed = torch.round(flat * 2.0**frac_bits)
    limit = (2**63 - 1) // len(parts)  # the true sum must fit in int64
    if flat.numel() and not torch.isfinite(flat).all():
        raise ValueError(f"user {user}'s update has a NaN or infinite value: it cannot be masked")
    if flat.numel() and float(fixed.abs().max()) > limit:
        raise OverflowError(f"update value too large for frac_bits={frac_bits} with {len(parts)} users "
                            f"(|x| must be below {limit / 2.0**frac_bits:.3g})")
    acc = fixed.to(torch.int64).numpy().view(np.uint64).copy()
    for other in parts:  # uint64 arithmetic wraps modulo 2^64 by definition
        if other > user:
            acc += _pair_mask(round_seed, user, other, acc.size)
        elif other < user:
            acc -= _pair_mask(round_seed, user, other, acc.size)
    masked = torch.from_numpy(acc.view(np.int64))
    out, start = {}, 0
    for k in keys:
        n = update[k].numel()
        out[k] = masked[start:start + n].reshape(update[k].shape)
        start += n
    return MaskedUpdate(out, user, parts, round_seed, frac_bits)


def _check_complete(masked: list[Update], frac_bits: int) -> None:
    meta = [m for m in masked if isinstance(m, MaskedUpdate)]
    if not meta:
        return  # plain dicts carry no sender information: nothing to check
    parts = meta[0].participants
    if any(m.participants != parts or m.round_seed != meta[0].round_seed for m in meta):
        raise ValueError("secure aggregation: masked updates come from different rounds/participant sets")
    if any(m.frac_bits != frac_bits for m in meta):
        raise ValueError(f"secure aggregation: updates were encoded with frac_bits != {frac_bits}")
    users = [m.user for m in meta]
    if len(set(users)) != len(users):
        raise ValueError(f"secure aggregation: duplicate masked updates from users {users}")
    missing = sorted(set(parts) - set(users))
    if missing:
        raise RuntimeError(
            f"secure aggregation: participants {missing} of {list(parts)} did not send their masked "
            "update; their pairwise masks do not cancel and dropout recovery is not implemented, "
            "so this round's sum cannot be unmasked")


def unmask_sum(masked: list[Update], frac_bits: int, dtype: torch.dtype = torch.float32) -> Update:
    """Sum the masked updates in Z/2^64 (masks cancel) and decode the fixed-point sum to
    ``dtype`` (every tensor, integer buffers included). Error ≤ n_users·2^-(frac_bits+1)."""
    if not masked:
        raise ValueError("secure aggregation: no masked updates to sum")
    _check_complete(masked, frac_bits)
    out = {}
    for k in sorted(masked[0]):
        acc = np.zeros(masked[0][k].numel(), dtype=np.uint64)
        for m in masked:
            acc += m[k].reshape(-1).cpu().numpy().view(np.uint64)
        total = torch.from_numpy(acc.view(np.int64).astype(np.float64) / 2.0**frac_bits)
        out[k] = total.reshape(masked[0][k].shape).to(dtype)
    return out


def masked_bits(update: Update) -> int:
    """Uplink bits of a masked update: 64 per entry (ring elements are uniform: incompressible,
    and sparsity is lost, so sparse codecs give no saving under masking)."""
    return 64 * sum(v.numel() for v in update.values())


def secure_aggregate(updates: dict[int, Update], round_seed: int, frac_bits: int = 24,
                     weights: dict[int, float] | None = None,
                     dtype: torch.dtype = torch.float32) -> Update:
    """Simulate one round: each user pre-multiplies by its weight, masks; the BS unmasks the sum.

    With ``weights`` = {k: N_k/ΣN} the result is the weighted average Σ_k w_k Δ_k.
    """
    users = sorted(updates)
    masked = []
    for k in users:
        w = 1.0 if weights is None else float(weights[k])
        upd = {n: t.detach().double() * w for n, t in updates[k].items()}
        masked.append(mask_update(upd, k, users, round_seed, frac_bits))
    return unmask_sum(masked, frac_bits, dtype)
