"""Local training, evaluation and aggregation helpers shared by every method."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from semfl import metrics
from semfl.wireless.channel import Channel, seed_channels
from semfl.config import TrainConfig
from semfl.models import ImageSpec, build_model
from semfl.models.classifier import ResNetClassifier
from semfl.training import (RunningAverage, apply_masks, evaluate_semantic, load_weights,
                            local_train, reconstruction_loss, weights_of)

SPEC = ImageSpec(1, 28, 28, 2)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("csc", "tiny", SPEC, Channel("awgn"))


def _classifier():
    torch.manual_seed(100)
    model = ResNetClassifier(SPEC, 8, 4).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _data(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.2
    for i, c in enumerate(labels.tolist()):
        r = 3 if c == 0 else 17
        images[i, 0, r:r + 8, r:r + 8] = 0.9
    return images, labels


# ---------------------------------------------------------------- RunningAverage

def test_running_average_equals_weighted_mean():
    g = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(5)]
    weights = [1854.0, 2000.0, 3.5, 9281.0, 1.0]
    avg = RunningAverage()
    for update, weight in zip(updates, weights):
        avg.add(update, weight)
    assert avg.weight == pytest.approx(sum(weights))
    out = avg.result(updates[0])
    total = sum(weights)
    for key in ("w", "b"):
        expected = sum(w * u[key].double() for u, w in zip(updates, weights)) / total
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key].double(), expected, rtol=0, atol=1e-6)
    # the result in float64 when asked for it is exact to float64 rounding
    out64 = avg.result({k: v.double() for k, v in updates[0].items()})
    expected = sum(w * u["w"].double() for u, w in zip(updates, weights)) / total
    torch.testing.assert_close(out64["w"], expected, rtol=1e-12, atol=1e-12)


def test_running_average_does_not_alias_inputs():
    a = {"w": torch.ones(3)}
    avg = RunningAverage()
    avg.add(a, 2.0)
    avg.add({"w": torch.zeros(3)}, 2.0)
    assert torch.equal(a["w"], torch.ones(3))  # the first reply is not modified by later adds
    torch.testing.assert_close(avg.result(a)["w"], torch.full((3,), 0.5))


def test_running_average_single_and_empty():
    avg = RunningAverage()
    with pytest.raises(RuntimeError, match="no replies"):
        avg.result({"w": torch.zeros(1)})
    w = {"w": torch.tensor([1.5, -2.0])}
    avg.add(w, 7.0)
    torch.testing.assert_close(avg.result(w)["w"], w["w"])


# ---------------------------------------------------------------- weights in place

def test_weights_of_and_load_weights_round_trip_in_place():
    model = _model(0)
    params_before = {name: p for name, p in model.named_parameters()}
    ptrs_before = {name: p.data_ptr() for name, p in model.named_parameters()}
    w0 = weights_of(model)
    assert set(w0) == set(params_before)
    # a copy, not a view of the model's storage
    for name, value in w0.items():
        assert value.data_ptr() != ptrs_before[name]
        assert not value.requires_grad

    other = weights_of(_model(1))
    assert any(not torch.equal(other[k], w0[k]) for k in w0)
    load_weights(model, other)
    for name, p in model.named_parameters():
        assert p is params_before[name]  # same parameter objects
        assert p.data_ptr() == ptrs_before[name]  # same storage
        assert torch.equal(p.detach(), other[name])
    round_trip = weights_of(model)
    assert all(torch.equal(round_trip[k], other[k]) for k in other)

    load_weights(model, w0)
    assert all(torch.equal(p.detach(), w0[n]) for n, p in model.named_parameters())
    # a partial dict loads just those
    name = next(iter(w0))
    load_weights(model, {name: torch.zeros_like(w0[name])})
    assert float(dict(model.named_parameters())[name].detach().abs().sum()) == 0.0


# ---------------------------------------------------------------- local training

def test_local_train_with_masks_keeps_pruned_weights_zero():
    model = _model(0)
    x, y = _data(32)
    g = torch.Generator().manual_seed(0)
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() > 1:
            masks[name] = (torch.rand(p.shape, generator=g) > 0.5).to(p.dtype)
    params = dict(model.named_parameters())
    apply_masks(params, masks)
    before = weights_of(model)
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)
    seed_channels(0)
    loss = local_train(model, x, y, cfg, 10.0, _classifier(), torch.Generator().manual_seed(0), masks=masks)
    assert math.isfinite(loss)
    after = weights_of(model)
    changed = False
    for name, mask in masks.items():
        assert torch.all(after[name][mask == 0] == 0), name
        changed |= not torch.equal(after[name][mask == 1], before[name][mask == 1])
    assert changed  # the kept weights did train
    # the update is sparse with the mask's support
    for name, mask in masks.items():
        assert torch.all((after[name] - before[name])[mask == 0] == 0)


def test_local_train_without_masks_changes_all_layers():
    model = _model(0)
    x, y = _data(16)
    before = weights_of(model)
    seed_channels(0)
    local_train(model, x, y, TrainConfig(local_epochs=1, batch_size=8, lr=0.05), 10.0, _classifier(),
                torch.Generator().manual_seed(0))
    after = weights_of(model)
    assert all(not torch.equal(after[k], before[k]) for k in before if k.endswith("weight"))


def test_local_train_reduces_loss():
    model = _model(0)
    x, y = _data(32)
    classifier = _classifier()
    cfg = TrainConfig(local_epochs=1, batch_size=8, lr=0.05)
    generator = torch.Generator().manual_seed(0)
    seed_channels(0)
    start = evaluate_semantic(model, classifier, x, y, 20.0, 64)["mse"]
    losses = [local_train(model, x, y, cfg, 20.0, classifier, generator) for _ in range(6)]
    end = evaluate_semantic(model, classifier, x, y, 20.0, 64)["mse"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert end < 0.8 * start, (start, end)


def test_local_train_is_deterministic():
    x, y = _data(16)
    cfg = TrainConfig(local_epochs=1, batch_size=8, lr=0.05)
    results = []
    for _ in range(2):
        model = _model(0)
        seed_channels(0)
        loss = local_train(model, x, y, cfg, 10.0, _classifier(), torch.Generator().manual_seed(0))
        results.append((loss, weights_of(model)))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_local_train_task_weight_uses_classifier_ce():
    x, y = _data(8)
    classifier = _classifier()
    recon = x.clamp(0.05, 0.95)
    loss, parts = reconstruction_loss(recon, x, y, classifier, 0.0)
    assert set(parts) == {"mse"} and float(loss) == pytest.approx(float(F.mse_loss(recon, x)))
    loss, parts = reconstruction_loss(recon, x, y, classifier, 0.5)
    ce = F.cross_entropy(classifier(recon), y)
    assert float(loss) == pytest.approx(float(F.mse_loss(recon, x) + 0.5 * ce), rel=1e-6)
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-6)

    model = _model(0)
    seed_channels(0)
    value = local_train(model, x, y, TrainConfig(local_epochs=1, batch_size=4, lr=0.01, task_weight=1.0), 10.0,
                        classifier, torch.Generator().manual_seed(0))
    assert math.isfinite(value) and value > 0.3  # includes a CE term of about log 2
    assert all(not p.requires_grad for p in classifier.parameters())


# ---------------------------------------------------------------- evaluation

def test_evaluate_semantic():
    model = _model(0)
    classifier = _classifier()
    x, y = _data(20)
    seed_channels(0)
    out = evaluate_semantic(model, classifier, x, y, 10.0, batch_size=7)  # uneven last batch
    assert out["loss"] == pytest.approx(out["mse"] + out["ce"], abs=1e-12)
    assert 0.0 <= out["accuracy"] <= 1.0
    assert out["mse"] > 0 and out["ce"] > 0
    assert {"psnr_db", "ssim"} <= set(out)
    assert not model.training
    # batch-size independent (a noiseless channel makes the forward deterministic)
    seed_channels(0)
    high = evaluate_semantic(model, classifier, x, y, 200.0, batch_size=7)
    seed_channels(0)
    high_one = evaluate_semantic(model, classifier, x, y, 200.0, batch_size=100)
    for key in ("mse", "ce", "accuracy", "psnr_db", "ssim"):
        assert high[key] == pytest.approx(high_one[key], rel=1e-5, abs=1e-6), key
    with torch.no_grad():
        recon = model(x, 200.0).recon
        logits = classifier(recon)
    assert high_one["ssim"] == pytest.approx(float(metrics.ssim(recon, x)), rel=1e-5)
    assert high_one["mse"] == pytest.approx(float(F.mse_loss(recon, x)), rel=1e-5)
    assert high_one["ce"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert high_one["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert high_one["psnr_db"] == pytest.approx(float(metrics.psnr_per_image(recon, x).mean()), rel=1e-5)
    # at the SNR asked for: the model's own output at -10 dB on the same channel draws (this untrained
    # model's output moves little with the noise, but measurably: 1e-5 relative is far below the gap)
    seed_channels(0)
    noisy = evaluate_semantic(model, classifier, x, y, -10.0, batch_size=100)
    seed_channels(0)
    with torch.no_grad():
        recon_noisy = model(x, torch.full((len(x),), -10.0)).recon
    assert noisy["mse"] == pytest.approx(float(F.mse_loss(recon_noisy, x)), rel=1e-6)
    assert noisy["ssim"] == pytest.approx(float(metrics.ssim(recon_noisy, x)), rel=1e-6)
    assert noisy["mse"] != pytest.approx(high_one["mse"], rel=1e-4)
