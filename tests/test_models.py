"""Semantic models (CSC student, DeepJSCC), the channel codec, the registry, the catalogue and the frozen classifier."""
from __future__ import annotations

import pytest
import torch

from semfl.wireless.channel import Channel
from semfl.models import SHARED, ImageSpec, available_archs, build_model
from semfl.models.catalogue import count, model_table
from semfl.models.channel_codec import ChannelCodec
from semfl.models.classifier import CLASSIFIER_PRESETS, DEPTHS, ResNetClassifier, frozen_classifier
from semfl.models.registry import shared_for

MNIST = ImageSpec(1, 28, 28, 10)
CIFAR = ImageSpec(3, 32, 32, 10)
SPECS = [MNIST, CIFAR]
SPEC_IDS = ["1x28x28", "3x32x32"]
FIRST_LAST = {"csc": ("stem.0.weight", "decoder.4.weight"), "jscc": ("encoder.0.weight", "decoder.6.weight")}


@pytest.fixture(scope="module")
def channel():
    return Channel("awgn")


def _model(arch, spec, channel, scale="tiny", seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(arch, scale, spec, channel, **kwargs)


# ---------------------------------------------------------------- forward contract

@pytest.mark.parametrize("arch", ["csc", "jscc"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_shapes_power_range(arch, spec, channel):
    model = _model(arch, spec, channel)
    shared = SHARED["tiny"]
    B = 3
    tokens = (spec.height // shared.patch) * (spec.width // shared.patch)
    assert model.tokens == tokens and model.semantic_dim == shared.semantic_dim
    images = torch.rand(B, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(1))
    out = model(images, 10.0)
    assert out.S.shape == (B, tokens, shared.semantic_dim)
    assert out.C.shape == (B, tokens, shared.semantic_dim)
    assert out.X.is_complex() and out.X.shape == (B, tokens * shared.symbols_per_token)
    power = (out.X.real ** 2 + out.X.imag ** 2).mean(dim=1)
    torch.testing.assert_close(power, torch.ones(B), rtol=1e-5, atol=1e-5)
    assert out.recon.shape == images.shape
    assert out.recon.min() >= 0.0 and out.recon.max() <= 1.0
    assert torch.isfinite(out.recon).all() and torch.isfinite(out.C).all()


@pytest.mark.parametrize("arch", ["csc", "jscc"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_gradients_reach_first_and_last_layer(arch, spec, channel):
    model = _model(arch, spec, channel)
    images = torch.rand(2, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(2))
    out = model(images, torch.tensor([0.0, 20.0]))  # a per-sample SNR tensor
    loss = (out.recon - images).pow(2).mean()
    loss.backward()
    params = dict(model.named_parameters())
    first, last = FIRST_LAST[arch]
    for name in (first, last):
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # every parameter takes part in the forward pass
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("arch", ["csc", "jscc"])
def test_per_sample_snr(arch, channel):
    from semfl.wireless.channel import seed_channels

    model = _model(arch, MNIST, channel).eval()
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    out = model(images, torch.tensor([0.0, 5.0, 10.0, 25.0]))
    assert out.recon.shape == images.shape
    # each image at its own SNR: two noise draws move the received features of the 0 dB images far
    # more than those of the 60 dB ones
    draws = []
    for seed in (1, 2):
        seed_channels(seed)
        with torch.no_grad():
            draws.append(model(images, torch.tensor([0.0, 60.0, 0.0, 60.0])).C)
    spread = (draws[0] - draws[1]).flatten(1).pow(2).mean(1)
    assert spread[[1, 3]].max() < 1e-4 * spread[[0, 2]].min()
    with pytest.raises(ValueError, match="snr_db"):
        model(images, torch.tensor([0.0, 5.0]))


@pytest.mark.parametrize("arch", ["csc", "jscc"])
def test_higher_snr_means_closer_channel_output(arch):
    # The channel sits between X and C: with no noise C is a deterministic function of S.
    from semfl.wireless.channel import seed_channels

    model = _model(arch, MNIST, Channel("awgn")).eval()
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        seed_channels(0)
        c_low = [model(images, 0.0).C for _ in range(2)]
        c_high = [model(images, 60.0).C for _ in range(2)]
    spread_low = (c_low[0] - c_low[1]).pow(2).mean()
    spread_high = (c_high[0] - c_high[1]).pow(2).mean()
    assert spread_high < 1e-3 * spread_low


def test_families_share_the_token_layout(channel):
    shapes = set()
    for arch in available_archs():
        model = _model(arch, CIFAR, channel)
        out = model(torch.rand(2, 3, 32, 32), 10.0)
        shapes.add((tuple(out.S.shape), tuple(out.C.shape)))
    assert len(shapes) == 1, shapes


def test_semantic_dim_and_symbols_overrides(channel):
    model = _model("csc", MNIST, channel, semantic_dim=24, symbols_per_token=3)
    out = model(torch.rand(2, 1, 28, 28), 10.0)
    assert out.S.shape == (2, 49, 24) and out.C.shape == (2, 49, 24) and out.X.shape == (2, 49 * 3)
    shared = shared_for("tiny", 24, 0)
    assert shared.semantic_dim == 24 and shared.symbols_per_token == SHARED["tiny"].symbols_per_token


def test_build_model_errors(channel):
    with pytest.raises(ValueError, match="model.arch"):
        build_model("vgg", "tiny", MNIST, channel)
    with pytest.raises(ValueError, match="scale"):
        build_model("csc", "huge", MNIST, channel)
    with pytest.raises(ValueError, match="patch"):
        build_model("csc", "tiny", ImageSpec(1, 30, 30, 10), channel)


# ---------------------------------------------------------------- channel codec

def test_channel_codec_shapes_and_power():
    torch.manual_seed(0)
    codec = ChannelCodec(semantic_dim=16, symbols_per_token=3, hidden=8)
    S = torch.randn(5, 7, 16)
    X = codec.encode(S)
    assert X.is_complex() and X.shape == (5, 21)
    torch.testing.assert_close(X.abs().pow(2).mean(dim=1), torch.ones(5), rtol=1e-5, atol=1e-5)
    C = codec.decode(X, tokens=7)
    assert C.shape == S.shape
    # tokens are independent: changing one token's features only changes that token's symbols and output
    S2 = S.clone()
    S2[:, 3] += 1.0
    z1 = codec.encoder(S).reshape(5, 7, -1)
    z2 = codec.encoder(S2).reshape(5, 7, -1)
    changed = (z1 - z2).abs().sum(dim=(0, 2)) > 0
    assert changed.tolist() == [i == 3 for i in range(7)]


# ---------------------------------------------------------------- parameter counts

def test_paper_csc_parameter_count_on_meta():
    with torch.device("meta"):
        model = build_model("csc", "paper", MNIST, Channel("awgn"))
    assert next(model.parameters()).is_meta
    assert abs(count(model) - 54.7e6) / 54.7e6 < 0.05


def test_catalogue_contains_every_arch():
    rows = model_table("paper")
    archs = {r["arch"] for r in rows}
    assert set(available_archs()) <= archs
    assert f"resnet{CLASSIFIER_PRESETS['paper'].depth}" in archs
    assert all(r["scale"] == "paper" and r["parameters"] > 0 for r in rows)
    csc = next(r for r in rows if r["arch"] == "csc")
    assert csc["role"] == "student" and abs(csc["parameters"] - 54.7e6) / 54.7e6 < 0.05
    tiny = {r["arch"]: r["parameters"] for r in model_table("tiny")}
    assert all(tiny[a] < csc["parameters"] for a in available_archs())
    with pytest.raises(ValueError, match="dataset"):
        model_table("tiny", "imagenet")


# ---------------------------------------------------------------- classifier

@pytest.mark.parametrize("depth", [8, 18, 34])
def test_resnet_depths_build_and_run(depth):
    torch.manual_seed(0)
    model = ResNetClassifier(CIFAR, depth, width=4).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("depth", [50, 101])
def test_deep_resnets_build_on_meta(depth):
    with torch.device("meta"):
        model = ResNetClassifier(MNIST, depth, width=64)
        logits = model(torch.empty(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    n = count(model)
    # ImageNet ResNet-50 / 101 have 25.6 M / 44.5 M parameters with a 1000-class head and 7x7 stem
    expected = {50: 23.5e6, 101: 42.5e6}[depth]
    assert abs(n - expected) / expected < 0.05


def test_resnet_unknown_depth():
    with pytest.raises(ValueError, match="classifier.depth"):
        ResNetClassifier(MNIST, 19, 8)
    assert set(DEPTHS) == {8, 18, 34, 50, 101}


def _square_dataset(n: int = 200, seed: int = 0):
    """Class 0: a bright square top-left; class 1: bottom-right; on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.2
    for i, c in enumerate(labels.tolist()):
        r = 3 if c == 0 else 17
        images[i, 0, r:r + 8, r:r + 8] = 1.0
    return images, labels


def test_frozen_classifier_trains_caches_and_reloads(tmp_path):
    spec = ImageSpec(1, 28, 28, 2)
    x, y = _square_dataset()
    kwargs = dict(scale="tiny", epochs=3, lr=1e-2, batch_size=32, cache_dir=tmp_path / "cache", seed=0)
    model, path, trained = frozen_classifier(spec, "squares", x, y, **kwargs)
    assert trained is True
    assert path.is_file() and path.parent == tmp_path / "cache"
    assert list(path.parent.glob("*.tmp")) == []  # the atomic write left nothing behind
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(x)
    accuracy = float((logits.argmax(1) == y).float().mean())
    assert accuracy > 0.95

    again, path2, trained2 = frozen_classifier(spec, "squares", x, y, **kwargs)
    assert trained2 is False and path2 == path
    assert not again.training and all(not p.requires_grad for p in again.parameters())
    with torch.no_grad():
        assert torch.equal(again(x), logits)

    # another seed or other data is another cache entry
    _, path3, trained3 = frozen_classifier(spec, "squares", x, y, **{**kwargs, "seed": 1, "epochs": 1})
    assert trained3 is True and path3 != path
    # so is another learning rate or batch size (the cache must not return a model trained otherwise)
    _, path4, trained4 = frozen_classifier(spec, "squares", x, y, **{**kwargs, "lr": 1e-3, "epochs": 1})
    _, path5, trained5 = frozen_classifier(spec, "squares", x, y, **{**kwargs, "lr": 1e-3, "epochs": 1,
                                                                     "batch_size": 64})
    assert trained4 and trained5 and len({path, path3, path4, path5}) == 4


def test_frozen_classifier_corrupt_cache(tmp_path):
    spec = ImageSpec(1, 28, 28, 2)
    x, y = _square_dataset(40)
    kwargs = dict(scale="tiny", epochs=1, cache_dir=tmp_path, seed=0)
    _, path, _ = frozen_classifier(spec, "squares", x, y, **kwargs)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="unreadable"):
        frozen_classifier(spec, "squares", x, y, **kwargs)
