"""Secure aggregation (protocol.secagg): the base station, holding the run's config, seed and every
message of the round, cannot recover one user's update; up to n - t dropouts after masking are
recovered exactly; more skip the round."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag

from semfl.wireless.codecs import Payload
from semfl.config import LinkConfig
from semfl.wireless.link import Link
from semfl.protocol import secagg
from semfl.protocol.secagg_round import masked_reply, secure_sum, split_request
from semfl.protocol import seeding
from semfl.runtimes.local import LocalTransport

USERS, SIZES, FRAC_BITS, SEED, ROUND = 5, [40, 10, 25, 60, 33], 24, 7, 1
SHAPES = {"conv.weight": (8, 3, 3, 3), "fc.weight": (100, 40), "fc.bias": (10,)}


def updates(seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {u: {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()} for u in range(USERS)}


class Recording(LocalTransport):
    """The local transport that records every request and reply the base station handles, and
    whose users in ``drop[kind]`` do not answer that kind (their node died)."""

    def __init__(self, handlers, drop=None):
        super().__init__(Link(LinkConfig(), USERS, SEED), [(torch.zeros(n, 1), torch.zeros(n)) for n in SIZES], SEED,
                         torch.device("cpu"), handlers)
        self.round, self.drop, self.seen = ROUND, drop or {}, []

    def send(self, users, kind, payload, on_reply=None):
        alive = [u for u in users if u not in self.drop.get(kind, ())]
        for u in alive:
            self.seen.append(("request", kind, u, self._request_for(u, payload)))
        replies = super().send(alive, kind, payload, on_reply=None)
        for u, r in replies.items():
            self.seen.append(("reply", kind, u, r))
            if on_reply is not None:
                on_reply(u, r)
        return replies if on_reply is None else {}


def protocol_handlers(user_updates):
    def train(ctx, payload):
        return masked_reply(ctx.state, ctx.user, payload, user_updates[ctx.user], ctx.num_samples, FRAC_BITS, {})

    return {secagg.KEYS: lambda ctx, p: Payload(secagg.user_keys(ctx.state)),
            secagg.SHARES: lambda ctx, p: Payload(secagg.user_shares(ctx.state, ctx.user, p.tensors, p.meta["t"])),
            "train": train,
            secagg.UNMASK: lambda ctx, p: Payload(secagg.user_unmask(ctx.state, ctx.user, p.meta["survivors"],
                                                                     p.meta["dropped"]))}


def run_round(user_updates, drop=None, fraction=0.6):
    transport = Recording(protocol_handlers(user_updates), drop)
    logs: list[str] = []
    like = {k: torch.zeros(s) for k, s in SHAPES.items()}
    result, info = secure_sum(transport, list(range(USERS)), Payload(like), like, SIZES, fraction, FRAC_BITS, logs.append)
    return result, info, transport, logs


def weighted_mean(user_updates, users):
    total = sum(SIZES[u] for u in users)
    return {k: sum(user_updates[u][k].double() * SIZES[u] for u in users) / total for k in SHAPES}


def flat(tensors) -> np.ndarray:
    return np.concatenate([tensors[k].double().reshape(-1).numpy() for k in sorted(tensors)])


def test_sum_is_the_plain_weighted_mean_to_fixed_point_precision():
    user_updates = updates()
    result, info, transport, logs = run_round(user_updates)
    expected = weighted_mean(user_updates, range(USERS))
    # each user's encoding rounds to 2^-25; the weighted mean's error stays below USERS half-steps
    assert max(float((result[k] - expected[k]).abs().max()) for k in SHAPES) <= USERS * 2.0 ** -(FRAC_BITS + 1)
    assert info == {"secagg_threshold": 3, "secagg_dropped": []} and not logs
    # the protocol's messages are charged to the link, by kind: every request and reply
    rows = transport.link.drain(ROUND)
    n = sum(v.numel() for v in user_updates[0].values())
    up = {r["user"]: r["uplink_bits"] for r in rows}
    # keys (2 x 32 bytes) + 4 ciphertexts (12 nonce + 16 tag + 20 header + 2 x 52 shares) + 64-bit masked input
    # + unmask shares (5 b-shares of 52 bytes)
    assert all(bits == 2 * 32 * 8 + 4 * (12 + 16 + 20 + 104) * 8 + 64 * n + 5 * 52 * 8 for bits in up.values())
    assert all(r["downlink_bits"] > 4 * (12 + 16 + 20 + 104) * 8 for r in rows)


@pytest.mark.parametrize("dropped", [[3], [1, 4]])
def test_up_to_n_minus_t_dropouts_after_masking_are_recovered(dropped):
    user_updates = updates(1)
    result, info, _, logs = run_round(user_updates, drop={"train": dropped})
    survivors = [u for u in range(USERS) if u not in dropped]
    expected = weighted_mean(user_updates, survivors)
    assert info["secagg_dropped"] == dropped and not logs
    # the survivors' rounding errors, rescaled from the sharers' data total to the survivors'
    bound = len(survivors) * 2.0 ** -(FRAC_BITS + 1) * sum(SIZES) / sum(SIZES[u] for u in survivors)
    assert max(float((result[k] - expected[k]).abs().max()) for k in SHAPES) <= bound


@pytest.mark.parametrize("drop, step", [({"train": [0, 2, 4]}, "masked input"),
                                        ({secagg.KEYS: [0, 1, 2]}, "key advertisement"),
                                        ({secagg.UNMASK: [1, 2, 3]}, "unmasking")])
def test_more_dropouts_skip_the_round_with_a_log_line(drop, step):
    result, info, _, logs = run_round(updates(), drop=drop)
    assert result is None
    assert info["secagg_skipped"] == f"{step}: 2 of 5 users answered, threshold t = 3"
    assert logs == [f"secure aggregation: round {ROUND} skipped at {info['secagg_skipped']}; the global model is unchanged"]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_base_station_with_config_seed_and_every_message_cannot_recover_one_update():
    user_updates = updates(2)
    result, _, transport, _ = run_round(user_updates)
    target = 2
    truth = flat(user_updates[target]) * SIZES[target] / sum(SIZES)  # what user 2 encoded
    replies = {(kind, u): p for side, kind, u, p in transport.seen if side == "reply"}
    masked = replies[("train", target)].tensors
    ring = np.concatenate([masked[k].reshape(-1).numpy().view(np.uint64) for k in sorted(masked)])
    # everything the base station holds: it can even rebuild user 2's self-mask from the survivors'
    # b-shares (t of them), but the pairwise masks need a private key it never sees
    b_shares = [secagg.as_bytes(replies[(secagg.UNMASK, u)].tensors[f"b/{target}"]) for u in range(USERS)]
    best = ring - secagg.prg(secagg._shamir().combine_shares(b_shares), ring.size)
    estimate = best.view(np.int64).astype(np.float64) / 2.0 ** FRAC_BITS
    # the masks are fresh OS randomness each run: |r| of independent data stays below 5 standard
    # errors (0.07 here) but for a 6e-7 chance
    bound = 5 / np.sqrt(truth.size)
    assert abs(correlation(estimate, truth)) < bound
    # the seed-derived masks of the former scheme (derive_seed(seed, round, "secagg")) remove nothing
    round_seed = seeding.derive_seed(SEED, ROUND, "secagg")
    old = best.copy()
    for other in range(USERS):
        if other != target:
            mask = np.random.default_rng([round_seed % 2 ** 64, min(target, other), max(target, other)]).integers(
                0, 2 ** 64, size=ring.size, dtype=np.uint64, endpoint=False)
            old = old - mask if other > target else old + mask
    assert abs(correlation(old.view(np.int64).astype(np.float64), truth)) < bound
    # whereas the sum alone does carry information about user 2 (it is one of its terms)
    total = flat(result)
    assert correlation(total, truth) > 0.2
    # and the shares it relayed are sealed: no key the base station holds opens them
    ciphertext = secagg.as_bytes(replies[(secagg.SHARES, target)].tensors["to/0"])
    public = secagg.as_bytes(replies[(secagg.KEYS, 0)].tensors["c_pk"])
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    with pytest.raises(InvalidTag):
        AESGCM(secagg.agree(bytes(32), public, b"shares")).decrypt(ciphertext[:12], ciphertext[12:], None)


def test_same_config_and_seed_give_fresh_masks_and_the_same_sum():
    user_updates = updates(3)
    first, _, a, _ = run_round(user_updates)
    second, _, b, _ = run_round(user_updates)
    masked = lambda t: next(p for side, kind, u, p in t.seen if side == "reply" and kind == "train" and u == 0)  # noqa: E731
    assert not torch.equal(masked(a).tensors["fc.bias"], masked(b).tensors["fc.bias"])
    assert all(torch.equal(first[k], second[k]) for k in SHAPES)


def _three_users_after_sharing(user_updates):
    """Three users through steps 1-2 (keys, encrypted shares): their states, public keys and ciphertexts."""
    states = [{} for _ in range(3)]
    keys = [secagg.user_keys(s) for s in states]
    table = {f"{n}/{u}": keys[u][n] for u in range(3) for n in ("c_pk", "s_pk")}
    sent = [secagg.user_shares(states[u], u, table, 2) for u in range(3)]
    return states, keys, sent


def test_masks_and_share_keys_come_from_x25519_agreement_of_a_private_key():
    """A masked input is the fixed-point update + AES-CTR(b_u) + the pairwise masks, each keyed by
    HKDF-SHA256 of an X25519 secret, derived here with the cryptography package from one user's
    private key (which never leaves it) and the other's public key; a key anyone could compute from
    the relayed public keys would not match. The same for the keys sealing the relayed shares."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def key(private: bytes, public: torch.Tensor, purpose: bytes) -> bytes:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public.numpy().tobytes()))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"semfl-secagg/" + purpose).derive(secret)

    def aes_ctr(k: bytes, count: int) -> np.ndarray:
        encryptor = Cipher(algorithms.AES(k), modes.CTR(bytes(16))).encryptor()
        return np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64)

    user_updates = updates(5)
    states, keys, sent = _three_users_after_sharing(user_updates)
    private = [s[secagg.STATE] for s in states]
    # user 1 opens user 0's ciphertext with its own private c key and user 0's public one
    plain = AESGCM(key(private[1]["c_sk"], keys[0]["c_pk"], b"shares")).decrypt(
        secagg.as_bytes(sent[0]["to/1"])[:12], secagg.as_bytes(sent[0]["to/1"])[12:], None)
    assert secagg._unpack_shares(plain)[:2] == (0, 1)  # it opens (a wrong key raises InvalidTag): from 0, to 1
    masked = secagg.mask_input(states[0], 0, {1: sent[1]["to/0"], 2: sent[2]["to/0"]}, [0, 1, 2], user_updates[0],
                               FRAC_BITS)
    ring = np.concatenate([masked[k].reshape(-1).numpy().view(np.uint64) for k in sorted(masked)])
    expected = secagg.encode(user_updates[0], FRAC_BITS, 3) + aes_ctr(private[0]["b"], ring.size)
    for v in (1, 2):  # user 0 adds the masks of the pairs with larger indices
        pair = key(private[0]["s_sk"], keys[v]["s_pk"], b"mask")
        assert pair == key(private[v]["s_sk"], keys[0]["s_pk"], b"mask")  # both ends agree
        expected = expected + aes_ctr(pair, ring.size)
    assert np.array_equal(ring, expected)


def test_users_refuse_inconsistent_unmasking_and_tampered_shares():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    user_updates = updates(4)
    states, keys, sent = _three_users_after_sharing(user_updates)
    tampered = sent[1]["to/0"].clone()
    tampered[-1] ^= 1
    with pytest.raises(InvalidTag):
        secagg.mask_input(states[0], 0, {1: tampered, 2: sent[2]["to/0"]}, [0, 1, 2], user_updates[0], FRAC_BITS)
    # user 1 seals, under its key with user 0, shares that claim to come from user 2
    c_sk1 = states[1][secagg.STATE]["c_sk"]
    forged = AESGCM(secagg.agree(c_sk1, secagg.as_bytes(keys[0]["c_pk"]), b"shares")).encrypt(
        bytes(12), secagg._pack_shares(2, 0, bytes(32), bytes(32)), None)
    with pytest.raises(ValueError, match="claims to be from 2 to 0"):
        secagg.mask_input(states[0], 0, {1: secagg.as_tensor(bytes(12) + forged), 2: sent[2]["to/0"]}, [0, 1, 2],
                          user_updates[0], FRAC_BITS)
    for sharers in ([1, 2], [0], [0, 1, 7]):  # without itself, under t = 2, a user who held no keys
        with pytest.raises(ValueError, match="inconsistent set of sharers"):
            secagg.mask_input(states[0], 0, {1: sent[1]["to/0"], 2: sent[2]["to/0"]}, sharers, user_updates[0], FRAC_BITS)
    refusals = {"both shares of user 1": dict(survivors=[0, 1], dropped=[1]),
                "a user outside the sharers": dict(survivors=[0, 1, 5], dropped=[]),
                "fewer survivors than t = 2": dict(survivors=[0], dropped=[1, 2]),
                "the asked user not a survivor": dict(survivors=[1, 2], dropped=[0])}
    for case, lists in refusals.items():
        states, _, sent = _three_users_after_sharing(user_updates)
        secagg.mask_input(states[0], 0, {1: sent[1]["to/0"], 2: sent[2]["to/0"]}, [0, 1, 2], user_updates[0],
                          FRAC_BITS)
        with pytest.raises(ValueError, match="inconsistent survivors/dropped"):
            secagg.user_unmask(states[0], 0, **lists)
        assert secagg.STATE not in states[0], case  # the round's secrets are gone either way
    # the same lists, consistent: answered
    secagg.mask_input(states[1], 1, {0: sent[0]["to/1"], 2: sent[2]["to/1"]}, [0, 1, 2], user_updates[1], FRAC_BITS)
    assert set(secagg.user_unmask(states[1], 1, survivors=[0, 1], dropped=[2])) == {"b/0", "b/1", "s/2"}
    assert split_request(Payload({"w": torch.ones(1), "from/3": torch.ones(2)}))[1].keys() == {3}


def test_config_errors_name_the_field():
    from semfl.config import ConfigError, load_config

    for override, field in (("psfl.secagg_threshold=0", "psfl.secagg_threshold"),
                            ("psfl.secagg_frac_bits=60", "psfl.secagg_frac_bits"),
                            ("psfl.dp_noise_source=dice", "psfl.dp_noise_source")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, ["method=psfl", override])


def test_threshold_is_at_least_two_and_at_most_everyone():
    assert [secagg.threshold(0.6, n) for n in (1, 2, 3, 5, 10)] == [1, 2, 2, 3, 6]
    assert secagg.threshold(1.0, 7) == 7
