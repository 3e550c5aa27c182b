"""Payload codecs: exact bit counts (hand-computed) and lossless encode/decode round trips."""
from __future__ import annotations

import math

import pytest
import torch

from semfl.wireless.codecs import Payload, available_codecs, get_codec
from semfl.wireless.codecs.base import META_BITS
from semfl.wireless.codecs.sparse import position_bits, sparse_tensor_bits


def _sparse_tensor(numel: int, nonzeros: int, seed: int = 0, shape=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(numel)
    idx = torch.randperm(numel, generator=g)[:nonzeros]
    flat[idx] = torch.randn(nonzeros, generator=g).abs() + 0.1  # never exactly zero
    return flat.reshape(shape or (numel,))


def test_registered():
    assert {"dense", "sparse"} <= set(available_codecs())


def test_unknown_codec_names_it():
    with pytest.raises(ValueError, match="no-such-codec"):
        get_codec("no-such-codec")
    with pytest.raises(ValueError, match="no-such-codec"):
        Payload({"w": torch.zeros(3)}, codec="no-such-codec").bits()


# ---------------------------------------------------------------- dense

def test_dense_bits():
    dense = get_codec("dense")
    assert dense.tensor_bits(torch.zeros(3, 5)) == 32 * 15
    assert dense.tensor_bits(torch.zeros(7, dtype=torch.int64)) == 64 * 7
    assert dense.tensor_bits(torch.zeros(4, dtype=torch.float64)) == 64 * 4
    assert dense.tensor_bits(torch.zeros(4, dtype=torch.float16)) == 16 * 4
    assert dense.tensor_bits(torch.zeros(9, dtype=torch.uint8)) == 8 * 9
    assert dense.tensor_bits(torch.zeros(9, dtype=torch.bool)) == 9
    assert dense.tensor_bits(torch.zeros(())) == 32  # a 0-d tensor is one entry
    tensors = {"w": torch.randn(10, 4), "b": torch.randn(4), "labels": torch.arange(6)}
    assert dense.bits(tensors) == 32 * 40 + 32 * 4 + 64 * 6
    assert Payload(tensors).bits() == 32 * 44 + 64 * 6


def test_payload_meta_bits():
    tensors = {"w": torch.randn(5)}
    base = 32 * 5
    assert Payload(tensors).bits() == base
    assert Payload(tensors, meta={"num_samples": 100, "loss": 0.5}).bits() == base + 2 * META_BITS
    assert META_BITS == 32
    nested = {"num_samples": 100, "losses": [0.1, 0.2, 0.3], "stats": {"a": 1, "b": {"c": 2, "d": (3, 4)}}}
    assert Payload(tensors, meta=nested).bits() == base + 32 * (1 + 3 + 1 + 1 + 2)
    # lists of lists and lists of dicts count every scalar inside them
    deep = {"protos": [[1.0, 2.0], [3.0, 4.0, 5.0]], "per_user": [{"n": 1, "loss": 0.5}, {"n": 2, "loss": 0.25}]}
    assert Payload(tensors, meta=deep).bits() == base + 32 * (5 + 4)
    assert Payload(tensors, meta={"empty": [], "none": {}}).bits() == base


# ---------------------------------------------------------------- sparse

def test_sparse_bits_index_list_hand_computed():
    t = _sparse_tensor(1000, 10)
    assert int(torch.count_nonzero(t)) == 10
    expected = 1 + 32 + 10 * 32 + min(10 * math.ceil(math.log2(1000)), 1000)
    assert expected == 1 + 32 + 320 + 100
    sparse = get_codec("sparse")
    assert sparse.tensor_bits(t) == expected
    assert sparse.tensor_bits(t.reshape(10, 100)) == expected  # shape does not matter
    assert Payload({"t": t}, codec="sparse", meta={"n": 3}).bits() == expected + 32


def test_sparse_bits_bitmap_when_denser():
    t = _sparse_tensor(100, 60, seed=1)
    # index list 60 * 7 = 420 bits > bitmap 100 bits
    assert position_bits(100, 60) == 100
    expected = 1 + 32 + 60 * 32 + 100
    assert get_codec("sparse").tensor_bits(t) == expected
    assert expected < 32 * 100  # still cheaper than dense


def test_sparse_dense_fallback_without_zeros():
    t = torch.randn(50, generator=torch.Generator().manual_seed(2)).abs() + 0.1
    assert get_codec("sparse").tensor_bits(t) == 1 + 32 * 50
    # and more generally whenever sparse would cost more than dense
    assert sparse_tensor_bits(100, 99) == 1 + 32 * 100


def test_sparse_bits_edge_cases():
    sparse = get_codec("sparse")
    assert sparse.tensor_bits(torch.zeros(1000)) == 1 + 32  # just the count
    assert sparse.tensor_bits(torch.zeros(())) == 1 + 32  # min(32 + 0 + 0, 32)
    # int64 values take 64 bits each
    labels = torch.zeros(1000, dtype=torch.int64)
    labels[:3] = torch.tensor([1, 2, 3])
    assert sparse.tensor_bits(labels) == 1 + 32 + 3 * 64 + 3 * 10
    # sums over tensors
    a, b = _sparse_tensor(1000, 10), _sparse_tensor(100, 60, seed=1)
    assert sparse.bits({"a": a, "b": b}) == sparse.tensor_bits(a) + sparse.tensor_bits(b)


def test_sparse_never_costs_more_than_dense_plus_flag():
    dense = get_codec("dense")
    sparse = get_codec("sparse")
    for numel in (1, 2, 7, 64, 1000):
        for k in {0, 1, numel // 3, numel // 2, numel}:
            t = _sparse_tensor(numel, k, seed=numel + k)
            assert sparse.tensor_bits(t) <= dense.tensor_bits(t) + 1


# ---------------------------------------------------------------- round trips

def _assert_same(decoded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert decoded.keys() == original.keys()
    for k, v in original.items():
        assert decoded[k].dtype == v.dtype, k
        assert decoded[k].shape == v.shape, k
        assert torch.equal(decoded[k], v), k


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_encode_decode_round_trip_exact(name):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, 3, generator=g)
    w[w.abs() < 0.8] = 0.0  # roughly half zeros
    tensors = {
        "w": w,
        "dense": torch.randn(17, generator=g),
        "zeros": torch.zeros(4, 4),
        "labels": torch.tensor([3, 0, 9, 0, 1], dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "double": torch.randn(3, dtype=torch.float64, generator=g),
        "view": torch.randn(4, 6, generator=g).t(),  # non-contiguous
    }
    codec = get_codec(name)
    data = codec.encode(tensors)
    assert isinstance(data, bytes)
    _assert_same(codec.decode(data), tensors)


def test_sparse_encoding_is_compact():
    t = _sparse_tensor(100_000, 10)
    sparse, dense = get_codec("sparse"), get_codec("dense")
    assert len(sparse.encode({"t": t})) < len(dense.encode({"t": t})) / 10


def test_payload_per_tensor_codecs():
    """A payload may name a codec per tensor (FTTQ: ternary layers + dense rest); bits add up per group."""
    tern = torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    dense = torch.randn(7)
    p = Payload({"q": tern, "fp": dense}, codec="dense", codecs={"q": "ternary"}, meta={"n": 1})
    assert p.codec_of("q") == "ternary" and p.codec_of("fp") == "dense"
    assert p.bits() == (2 * 6 + 32) + 32 * 7 + META_BITS
    # without overrides: unchanged single-codec behaviour
    assert Payload({"q": tern, "fp": dense}).bits() == 32 * 13
    with pytest.raises(ValueError, match="ternary"):
        Payload({"q": tern, "fp": dense}, codec="ternary").bits()  # fp is not ternary
    with pytest.raises(ValueError, match="not in the payload"):
        Payload({"q": tern}, codecs={"other": "ternary"}).bits()
    with pytest.raises(ValueError, match="no-such-codec"):
        Payload({}, codec="no-such-codec").bits()
