"""Privacy for PSFL uploads (PSFL Section II-B): user-level (ε, δ)-DP.

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

**Secure aggregation** lives in :mod:`semfl.protocol.secagg` (X25519 key agreement, Shamir
shares, dropout recovery). It hides single updates from the base station, not the aggregate:
DP protects the aggregate. Threat models: docs/security.md.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

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
