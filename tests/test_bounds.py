"""The centralised (ceiling) and local (floor) bounds, and the same start from the foundation for every contender."""
from __future__ import annotations

import pytest
import torch

from conftest import local_method
from semfl.wireless.codecs.base import META_BITS
from semfl.config import load_config
from semfl.methods.foundation import foundation_weights
from semfl.methods import get_method
from semfl.methods.bounds import Centralised, Local
from semfl.methods.common import build_semantic_model
from semfl.methods.fedavg import FedAvg
from semfl.protocol import seeding
from semfl.training import load_weights, local_train, weights_of


@pytest.fixture
def overrides(tiny_overrides):
    return tiny_overrides + ["eval.snr_sweep=[]", "eval.grid_images=0", "train.task_weight=0.01"]


def test_centralised_uploads_each_users_pixels_once_and_trains_on_the_pool(overrides):
    cfg, run, user_data, transport, method = local_method(Centralised, overrides + ["method=centralised"])
    info = method.run_round(1, [0, 1, 2])
    rows = {r["user"]: r for r in run.link.drain(1)}
    for user, (x, y) in enumerate(user_data):
        n = len(y)
        # 8-bit pixels (1 x 28 x 28) and 8-bit labels, plus the reply's sample count
        assert rows[user]["uplink_bits"] == n * 28 * 28 * 8 + n * 8 + META_BITS
        assert rows[user]["downlink_bits"] == 0
        pixels, labels = method.pool[user]
        assert torch.equal(pixels.float() / 255, x.cpu()) and torch.equal(labels.long(), y.cpu())
    assert info["pooled_samples"] == sum(len(y) for _, y in user_data) and info["uploads"] == 3
    transport.round = 2
    info = method.run_round(2, [0, 1, 2])
    assert info["uploads"] == 0 and all(r["uplink_bits"] == 0 for r in run.link.drain(2))


def test_local_training_with_one_snr_per_sample_equals_one_snr_for_all_and_uses_each(overrides):
    """The pooled (centralised) training passes each sample's owner SNR: with every sample at 12 dB it
    is a user's local training at 12 dB; with other SNRs the model sees them."""
    cfg = load_config(None, overrides + ["train.optimizer=adam", "train.lr=0.002"])
    from semfl.runtimes.run import build_context

    run, user_data = build_context(cfg, None, log=lambda m: None)
    x, y = user_data[0]
    models = [build_semantic_model(run, "csc") for _ in range(3)]
    for m in models[1:]:
        load_weights(m, weights_of(models[0]))
    per_sample = (torch.full((len(x),), 12.0), 12.0, torch.linspace(0.0, 25.0, len(x)))
    flat = x.reshape(len(x), -1)
    assert all(int((flat == row).all(1).sum()) == 1 for row in flat)  # an image names its sample
    handed = []  # (images, SNRs) each batch of the third model is sent with
    models[2].register_forward_pre_hook(lambda module, args: handed.append((args[0].detach(), args[1].detach())))
    losses = []
    for model, snr in zip(models, per_sample):
        seeding.enter(7)  # the same channel noise
        losses.append(local_train(model, x, y, cfg.train, snr, run.classifier, torch.Generator().manual_seed(3)))
    # each sample goes through the channel at its own SNR
    assert sum(len(images) for images, _ in handed) == len(x) * cfg.train.local_epochs
    for images, snrs in handed:
        owners = [int(torch.nonzero((flat == image.reshape(1, -1)).all(1))[0]) for image in images]
        assert torch.equal(snrs, per_sample[2][owners])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert losses[2] != pytest.approx(losses[1], rel=1e-4)


def test_local_users_train_alone_from_the_initial_model_and_keep_their_own(overrides):
    cfg, run, user_data, transport, local = local_method(Local, overrides + ["method=local"])
    _, _, _, fed_transport, fedavg = local_method(FedAvg, overrides + ["method=fedavg"])
    initial = {k: v.clone() for k, v in local.global_weights.items()}
    assert all(torch.equal(initial[k], fedavg.global_weights[k]) for k in initial)  # the same initial model
    local.run_round(1, [0, 1, 2])
    link = {r["user"]: r for r in run.link.drain(1)}
    dense_model = sum(v.numel() * 32 for v in initial.values())
    assert all(link[u]["downlink_bits"] == dense_model and link[u]["uplink_bits"] == 2 * META_BITS for u in range(3))
    # each user's model is what FedAvg's user would upload in round 1: the same local training
    fed_replies = fed_transport.send([0, 1, 2], "train", fedavg_request(fedavg))
    for user in range(3):
        own = local.user_weights(user)
        for k, v in fed_replies[user].tensors.items():
            assert torch.equal(own[k].cpu(), v.cpu()), (user, k)
    after_one = {u: local.user_weights(u) for u in range(3)}
    transport.round = 2
    local.run_round(2, [0, 1, 2])
    assert all(r["downlink_bits"] == 0 for r in run.link.drain(2))  # no exchange after the start
    assert not all(torch.equal(after_one[0][k], local.user_weights(0)[k]) for k in initial)
    rows = local.evaluate(2)
    users = [r for r in rows if r["scope"] == "user"]
    assert [r["user"] for r in users] == [0, 1, 2]
    assert rows[0]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in users) / 3)
    assert rows[0]["loss"] == pytest.approx(sum(r["loss"] for r in users) / 3)
    assert len({r["loss"] for r in users}) == 3  # three different models


def fedavg_request(fedavg):
    from semfl.wireless.codecs import Payload

    return Payload(fedavg.global_weights, codec="dense")


def test_bounds_state_the_contenders_objective():
    cfg = load_config(None, ["train.task_weight=0.01", "train.optimizer=adam", "train.lr=0.002"])
    fedavg = get_method("fedavg").objective(cfg)
    assert get_method("centralised").objective(cfg) == fedavg == get_method("local").objective(cfg)


@pytest.mark.parametrize("method", ["fedavg", "stc", "fttq", "fedpaq", "topk", "centralised", "local"])
def test_every_contender_can_start_from_psfls_foundation(overrides, method):
    found = ["foundation.samples=100", "foundation.epochs=1", "foundation.global_model=true", "model.arch=gsc-m",
             "data.user_fraction=0.5"]
    cfg, run, _, _, m = local_method(get_method(method), overrides + [f"method={method}"] + found)
    expected = foundation_weights(run, "gsc-m", lambda: build_semantic_model(run, "gsc-m"))
    if method == "fttq":  # FTTQ's global model is the ternarised foundation
        expected = m.requantise({k: v.to(run.device) for k, v in expected.items()})
    assert set(m.global_weights) == set(expected)
    for name, value in expected.items():
        assert torch.equal(m.global_weights[name].cpu(), value.cpu()), name


@pytest.mark.parametrize("bound", [Centralised, Local])
def test_bounds_resume_to_the_uninterrupted_run(overrides, tmp_path, monkeypatch, bound):
    from conftest import whole_and_resumed

    cfg = load_config(None, overrides + [f"method={bound.name}", "rounds=2", "data.max_per_user=48", "data.test_samples=50"])
    whole, resumed = whole_and_resumed(cfg, tmp_path, monkeypatch, bound, "run_round", 2,
                                       ("round", "scope", "user", "loss", "accuracy", "uplink_bits", "downlink_bits"))
    assert whole == resumed
