"""psfl.dp_noise_source, by behaviour (docs/security.md, "Differential privacy"): with "seed" the noise
of a user's upload follows from the run's seed, so the base station, which holds the config and the
seed, recomputes it and subtracts it exactly; with "os" it comes from the operating system's
randomness: two uploads of the same user, round and seed differ, the base station's recomputation
leaves the noise in, and the noise has the configured scale z * C."""
from __future__ import annotations

import pytest
import torch

from conftest import local_method
from semfl.methods.psfl.privacy import DPConfig, privatize
from semfl.protocol import seeding
from semfl.wireless.codecs import Payload


def uploads(tiny_overrides, source: str):
    """Two uploads of user 1's all-zero update in round 2 (same run, seed, user and round), and what
    the base station recomputes for that upload's noise from the config and the seed."""
    from semfl.methods.psfl.psfl import PSFL

    cfg, run, _, transport, method = local_method(PSFL, tiny_overrides + [
        "method=psfl", "psfl.dp=true", "psfl.dp_clip_norm=0.5", "psfl.dp_noise_multiplier=2.0",
        f"psfl.dp_noise_source={source}"], round_=2)
    zero = {k: torch.zeros_like(v) for k, v in method.global_weights.items()}
    request = Payload(method.global_weights, codec="dense", meta={})
    sent = []
    for _ in range(2):
        ctx = transport.context(1, "train")
        sent.append(method._upload(ctx, zero, None, {"num_samples": ctx.num_samples}, request).tensors)
    # the base station's guess: the user's generator, derived from what it holds (seed, round, user, kind)
    guess_generator = seeding.generator(seeding.derive_seed(cfg.seed, 2, 1, "train"), "dp")
    o = cfg.table("psfl")
    guess, _ = privatize(zero, DPConfig(True, o.dp_clip_norm, o.dp_noise_multiplier, o.dp_delta), len(run.parts),
                         guess_generator)
    return sent, guess


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten().double() for k in sorted(tensors) if tensors[k].is_floating_point()])


def test_seed_noise_is_recomputed_by_whoever_holds_the_seed(tiny_overrides):
    (first, second), guess = uploads(tiny_overrides, "seed")
    assert torch.equal(flat(first), flat(second))  # reproducible
    assert torch.equal(flat(first), flat(guess))  # the base station subtracts it exactly: no privacy from it


def test_os_noise_is_fresh_unrecoverable_and_of_the_configured_scale(tiny_overrides):
    (first, second), guess = uploads(tiny_overrides, "os")
    a, b, g = flat(first), flat(second), flat(guess)
    assert a.numel() > 10_000, a.numel()
    std = 2.0 * 0.5  # z * C ("local" mode: every upload carries the full noise)
    for noise in (a, b):
        assert float(noise.std()) == pytest.approx(std, rel=0.05) and abs(float(noise.mean())) < 0.05 * std
    # subtracting the recomputed noise removes none of it and adds its own: std sqrt(2) z C
    assert float((a - g).std()) == pytest.approx(2 ** 0.5 * std, rel=0.05)
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) == pytest.approx(0, abs=0.05)  # independent draws
    assert float(torch.corrcoef(torch.stack([a, g]))[0, 1]) == pytest.approx(0, abs=0.05)
