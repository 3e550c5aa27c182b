"""Secure aggregation with key agreement and dropout recovery (Bonawitz et al. 2017, SecAgg).

The base station learns the (weighted) sum of the survivors' updates and nothing else about a
single update, although it relays every message; users may drop out after masking. Four request
kinds, each a real payload through the transport (so the link is charged for every bit):

1. ``secagg_keys``: each user draws two X25519 key pairs (c: to encrypt shares, s: to agree
   masks) and returns both public keys. The base station broadcasts the table of public keys.
2. ``secagg_shares``: each user draws a self-mask seed b_u, Shamir-shares b_u and its s private
   key among the round's key holders with threshold t (flwr's SecAgg+ Shamir over GF(2^128),
   pycryptodome), and encrypts each pair of shares for its holder with AES-GCM under
   HKDF(X25519(c_u, c_v)). The base station relays the ciphertexts it cannot read.
3. the method's ``train`` request carries the ciphertexts for the user (``from/<v>``); the user
   keeps them, trains, and returns y_u = fixed(w_u Δ_u) + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)
   in Z/2^64 (:func:`mask_input`), s_uv = HKDF(X25519(s_u, s_v)), PRG = AES-256-CTR.
4. ``secagg_unmask``: the survivors (users whose masked input arrived) return their shares of
   b_v for every survivor v and of s_v for every user that dropped after sharing; an honest user
   refuses to reveal both for the same v. With t shares of each the base station removes the
   self-masks and the dropped users' pairwise masks, and decodes the sum.

Every secret comes from the operating system's randomness (``os.urandom``, X25519 key
generation), never from the run's seed, and keys are fresh each round. The decoded sum is exact
in the ring, so runs stay deterministic for a seed. Fewer than t users at any step: the round is
skipped (:class:`SecAggSkipped`). Threat model (docs/security.md): an honest-but-curious base
station and up to t − 1 colluding users learn nothing about an honest user's update beyond the
sum; there are no signatures (SecAgg's active-adversary consistency round), so a base station
that lies about who dropped out is not covered, and masked inputs cannot be checked for poison.
The complete graph of pairs is used (SecAgg), not SecAgg+'s sparse graph.
"""
from __future__ import annotations

import math
import os
import struct
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def _shamir():
    """Flower's Shamir secret sharing (flwr.common.secure_aggregation), imported when secure
    aggregation runs: flwr is an optional dependency (``pip install 'semfl[flower]'``)."""
    try:
        from flwr.common.secure_aggregation.crypto import shamir
    except ImportError as exc:
        raise RuntimeError("psfl.secure_aggregation needs Flower's Shamir secret sharing: "
                           "pip install 'semfl[flower]' (flwr 1.41.x)") from exc
    return shamir

KEYS, SHARES, UNMASK = "secagg_keys", "secagg_shares", "secagg_unmask"
KINDS = (KEYS, SHARES, UNMASK)
STATE = "secagg"  # the user's per-round secrets in its persistent state (dropped after unmasking)


class SecAggSkipped(RuntimeError):
    """Too few users at some step: the round's sum cannot be (safely) computed."""


def threshold(fraction: float, participants: int) -> int:
    """t: the fewest survivors needed to unmask (at least 2, at most all participants)."""
    return min(participants, max(2, math.ceil(fraction * participants)))


# ----------------------------------------------------------------------------- primitives
def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().to(torch.uint8).numpy().tobytes()


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends of a pair derive: HKDF-SHA256 of their X25519 shared secret."""
    secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"semfl-secagg/" + purpose).derive(secret)


def prg(key: bytes, count: int) -> np.ndarray:
    """``count`` uniform elements of Z/2^64 expanded from ``key`` (AES-256 in counter mode)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)) + encryptor.finalize(), dtype=np.uint64).copy()


def encode(update: dict[str, torch.Tensor], frac_bits: int, participants: int) -> np.ndarray:
    """Fixed point round(x 2^f) of the update's entries (sorted names) as ring elements."""
    flat = torch.cat([update[k].detach().reshape(-1).cpu().double() for k in sorted(update)])
    if flat.numel() and not bool(torch.isfinite(flat).all()):
        raise ValueError("secure aggregation: the update has a NaN or infinite value: it cannot be encoded")
    fixed = torch.round(flat * 2.0 ** frac_bits)
    limit = (2 ** 63 - 1) // max(1, participants)  # the true sum must fit in int64
    if flat.numel() and float(fixed.abs().max()) > limit:
        raise OverflowError(f"secure aggregation: update value too large for frac_bits={frac_bits} with "
                            f"{participants} users (|x| must be below {limit / 2.0 ** frac_bits:.3g})")
    return fixed.to(torch.int64).numpy().view(np.uint64).copy()


def decode(ring: np.ndarray, like: dict[str, torch.Tensor], frac_bits: int) -> dict[str, torch.Tensor]:
    values = torch.from_numpy(ring.view(np.int64).astype(np.float64) / 2.0 ** frac_bits)
    out, start = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = values[start:start + n].reshape(like[k].shape)
        start += n
    return out


def _pack_shares(src: int, dst: int, b_share: bytes, s_share: bytes) -> bytes:
    return struct.pack("<qqI", src, dst, len(b_share)) + b_share + s_share


def _unpack_shares(plain: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst, size = struct.unpack("<qqI", plain[:20])
    return src, dst, plain[20:20 + size], plain[20 + size:]


# ----------------------------------------------------------------------------- the user's side
def user_keys(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Step 1: fresh key pairs (kept in ``state``); returns the public keys."""
    c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    raw = serialization.PrivateFormat.Raw
    state[STATE] = {"c_sk": c.private_bytes(serialization.Encoding.Raw, raw, serialization.NoEncryption()),
                    "s_sk": s.private_bytes(serialization.Encoding.Raw, raw, serialization.NoEncryption())}
    return {"c_pk": as_tensor(_raw(c.public_key())), "s_pk": as_tensor(_raw(s.public_key()))}


def user_shares(state: dict[str, Any], user: int, tensors: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    """Step 2: from the broadcast public keys, Shamir-share b_u and s_u (threshold t) and encrypt
    each holder's pair of shares for it; returns ``to/<v>`` ciphertexts (nonce + AES-GCM)."""
    mine = state[STATE]
    holders = sorted(int(name.split("/")[1]) for name in tensors if name.startswith("c_pk/"))
    if user not in holders or len(holders) < t:
        raise ValueError(f"secure aggregation: {len(holders)} key holders for threshold {t} (user {user} among them?)")
    mine["c_pk"] = {v: as_bytes(tensors[f"c_pk/{v}"]) for v in holders}
    mine["s_pk"] = {v: as_bytes(tensors[f"s_pk/{v}"]) for v in holders}
    mine["holders"], mine["t"], mine["b"] = holders, t, os.urandom(32)
    shamir = _shamir()
    b_shares, s_shares = shamir.create_shares(mine["b"], t, len(holders)), shamir.create_shares(mine["s_sk"], t, len(holders))
    out, mine["shares"] = {}, {}
    for index, v in enumerate(holders):
        if v == user:
            mine["shares"][user] = (b_shares[index], s_shares[index])
            continue
        key = agree(mine["c_sk"], mine["c_pk"][v], b"shares")
        nonce = os.urandom(12)
        out[f"to/{v}"] = as_tensor(nonce + AESGCM(key).encrypt(nonce, _pack_shares(user, v, b_shares[index], s_shares[index]), None))
    return out


def mask_input(state: dict[str, Any], user: int, ciphertexts: dict[int, torch.Tensor], sharers: list[int],
               update: dict[str, torch.Tensor], frac_bits: int) -> dict[str, torch.Tensor]:
    """Step 3: keep the shares the other ``sharers`` sent (decrypted and checked), then mask the
    already weighted ``update``: y_u in Z/2^64 as int64 tensors of the update's shapes."""
    mine = state[STATE]
    sharers = sorted(sharers)
    if user not in sharers or not set(sharers) <= set(mine["holders"]) or len(sharers) < mine["t"]:
        raise ValueError(f"secure aggregation: user {user} got an inconsistent set of sharers {sharers}")
    for v in sharers:
        if v == user:
            continue
        key = agree(mine["c_sk"], mine["c_pk"][v], b"shares")
        raw = as_bytes(ciphertexts[v])
        src, dst, b_share, s_share = _unpack_shares(AESGCM(key).decrypt(raw[:12], raw[12:], None))
        if (src, dst) != (v, user):
            raise ValueError(f"secure aggregation: a share from {v} to {user} claims to be from {src} to {dst}")
        mine["shares"][v] = (b_share, s_share)
    mine["sharers"] = sharers
    ring = encode(update, frac_bits, len(sharers))
    ring += prg(mine["b"], ring.size)  # uint64 arithmetic wraps modulo 2^64 by definition
    for v in sharers:
        if v != user:
            mask = prg(agree(mine["s_sk"], mine["s_pk"][v], b"mask"), ring.size)
            ring = ring + mask if user < v else ring - mask
    masked = torch.from_numpy(ring.view(np.int64).copy())
    out, start = {}, 0
    for k in sorted(update):
        n = update[k].numel()
        out[k] = masked[start:start + n].reshape(update[k].shape)
        start += n
    return out


def user_unmask(state: dict[str, Any], user: int, survivors: list[int], dropped: list[int]) -> dict[str, torch.Tensor]:
    """Step 4: shares of b_v for survivors, of s_v for the dropped; the round's secrets are then
    forgotten. Refuses lists that overlap, leave the sharers or fall under the threshold."""
    mine = state.pop(STATE)
    survivors, dropped = set(survivors), set(dropped)
    sharers = set(mine.get("sharers", []))
    if survivors & dropped or not survivors | dropped <= sharers or len(survivors) < mine["t"] or user not in survivors:
        raise ValueError("secure aggregation: the unmasking request names inconsistent survivors/dropped users; "
                         "revealing those shares could expose an update")
    out = {f"b/{v}": as_tensor(mine["shares"][v][0]) for v in sorted(survivors)}
    out.update({f"s/{v}": as_tensor(mine["shares"][v][1]) for v in sorted(dropped)})
    return out


# ----------------------------------------------------------------------------- the base station's side
def remove_masks(masked_sum: np.ndarray, survivors: list[int], dropped: list[int], public_s: dict[int, bytes],
                 b_shares: dict[int, list[bytes]], s_shares: dict[int, list[bytes]]) -> np.ndarray:
    """The sum of the survivors' masked inputs minus their self-masks and the pairwise masks they
    shared with users that dropped after sharing (reconstructed from >= t shares each)."""
    shamir = _shamir()
    total = masked_sum.copy()
    for v in survivors:
        total -= prg(shamir.combine_shares(b_shares[v]), total.size)
    for v in dropped:
        secret = shamir.combine_shares(s_shares[v])
        for u in survivors:
            mask = prg(agree(secret, public_s[u], b"mask"), total.size)
            total = total + mask if u > v else total - mask  # u added -mask if u > v, +mask if u < v
    return total
