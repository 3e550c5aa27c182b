"""The base station's side of one secure-aggregation round (protocol.secagg) over any transport.

:func:`secure_sum` sends the four kinds of requests through ``transport.send`` (so every protocol
message is charged to the link, on the local transport and on Flower alike), follows who
answered at each step, and returns the weighted mean of the survivors' updates, or skips the
round when fewer than t users are left at some step. A user's train handler masks its update
with :func:`semfl.protocol.secagg.mask_input` (see :func:`masked_reply`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from semfl.wireless.codecs import Payload
from semfl.protocol import secagg

SHARE_BYTES = 52  # a Shamir share of a 32-byte secret (flwr: 4-byte index + 3 x 16-byte chunks)


def train_request(request: Payload, user: int, ciphertexts: dict[int, torch.Tensor], sharers: list[int],
                  t: int, total_samples: int) -> Payload:
    """The method's train request for ``user`` plus the shares sent to it (``from/<v>``, dense bytes)."""
    extra = {f"from/{v}": c for v, c in ciphertexts.items()}
    meta = {**request.meta, "secagg": {"sharers": sharers, "t": t, "total_samples": total_samples}}
    return Payload({**request.tensors, **extra}, codec=request.codec, meta=meta,
                   codecs={**request.codecs, **{name: "dense" for name in extra}})


def split_request(payload: Payload) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """A train request's model tensors and the ciphertexts addressed to the user, by sender."""
    model = {k: v for k, v in payload.tensors.items() if not k.startswith("from/")}
    return model, {int(k[5:]): v for k, v in payload.tensors.items() if k.startswith("from/")}


def masked_reply(state: dict, user: int, payload: Payload, update: dict[str, torch.Tensor], num_samples: int,
                 frac_bits: int, meta: dict[str, Any]) -> Payload:
    """A user's train reply under secure aggregation: its update weighted by N_u / ΣN and masked."""
    info = payload.meta["secagg"]
    _, ciphertexts = split_request(payload)
    weighted = {k: v.detach().double() * (num_samples / info["total_samples"]) for k, v in update.items()}
    masked = secagg.mask_input(state, user, ciphertexts, info["sharers"], weighted, frac_bits)
    return Payload(masked, codec="dense", meta=meta)  # int64 ring elements: 64 bits each, incompressible


def secure_sum(transport, users: list[int], request: Payload, like: dict[str, torch.Tensor], sizes: list[int],
               fraction: float, frac_bits: int, log: Callable[[str], None],
               on_reply: Callable[[int, Payload], None] | None = None) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """One round: returns (Σ_{survivors} N_u Δ_u / Σ_{survivors} N_u as float64 tensors, or None when
    the round is skipped; round info for the metrics). ``on_reply`` sees each masked train reply."""
    round_ = transport.round
    t = secagg.threshold(fraction, len(users))
    info: dict[str, Any] = {"secagg_threshold": t}

    def enough(step: str, have: list[int]) -> bool:
        if len(have) >= t:
            return True
        info["secagg_skipped"] = f"{step}: {len(have)} of {len(users)} users answered, threshold t = {t}"
        log(f"secure aggregation: round {round_} skipped at {info['secagg_skipped']}; the global model is unchanged")
        return False

    keys = {u: r for u, r in transport.send(users, secagg.KEYS, Payload(meta={"t": t})).items()
            if _sizes_ok(r, {"c_pk": 32, "s_pk": 32})}
    holders = sorted(keys)
    if not enough("key advertisement", holders):
        return None, info
    table = {f"{name}/{u}": keys[u].tensors[name] for u in holders for name in ("c_pk", "s_pk")}
    public_s = {u: secagg.as_bytes(keys[u].tensors["s_pk"]) for u in holders}
    shares = transport.send(holders, secagg.SHARES, Payload(table, meta={"t": t}))
    sharers = sorted(u for u, r in shares.items() if set(r.tensors) == {f"to/{v}" for v in holders if v != u})
    if not enough("share distribution", sharers):
        return None, info
    total = sum(sizes[u] for u in sharers)
    requests = {u: train_request(request, u, {v: shares[v].tensors[f"to/{u}"] for v in sharers if v != u},
                                 sharers, t, total) for u in sharers}
    masked_sum = None
    survivors: list[int] = []

    def collect(user: int, reply: Payload) -> None:
        nonlocal masked_sum
        flat = np.concatenate([reply.tensors[k].reshape(-1).numpy().view(np.uint64) for k in sorted(reply.tensors)])
        masked_sum = flat.copy() if masked_sum is None else masked_sum + flat
        survivors.append(user)
        if on_reply is not None:
            on_reply(user, reply)

    transport.send(sharers, "train", requests, on_reply=collect)
    survivors.sort()
    dropped = [u for u in sharers if u not in survivors]
    info["secagg_dropped"] = dropped
    if not enough("masked input", survivors):
        return None, info
    unmask = transport.send(survivors, secagg.UNMASK, Payload(meta={"survivors": survivors, "dropped": dropped}))
    wanted = {**{f"b/{v}": SHARE_BYTES for v in survivors}, **{f"s/{v}": SHARE_BYTES for v in dropped}}
    answered = sorted(u for u, r in unmask.items() if _sizes_ok(r, wanted))
    if not enough("unmasking", answered):
        return None, info
    b_shares = {v: [secagg.as_bytes(unmask[u].tensors[f"b/{v}"]) for u in answered] for v in survivors}
    s_shares = {v: [secagg.as_bytes(unmask[u].tensors[f"s/{v}"]) for u in answered] for v in dropped}
    ring = secagg.remove_masks(masked_sum, survivors, dropped, public_s, b_shares, s_shares)
    weighted = secagg.decode(ring, like, frac_bits)  # Σ_{survivors} N_u Δ_u / Σ_{sharers} N_u
    rescale = total / sum(sizes[u] for u in survivors)
    return {k: v * rescale for k, v in weighted.items()}, info


def _sizes_ok(reply: Payload, wanted: dict[str, int]) -> bool:
    """A protocol reply holds exactly the named byte strings of the expected lengths."""
    return set(reply.tensors) == set(wanted) and all(
        reply.tensors[k].dtype == torch.uint8 and reply.tensors[k].numel() == n for k, n in wanted.items())
