"""FedCL and its baselines on split models: SCG loss, exact split gradients, eq 5, link bits, FedProto."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import local_method, whole_and_resumed
from semfl.codecs import Payload
from semfl.config import ConfigError, load_config
from semfl.methods.fedcl import FedCL, batch_sizes
from semfl.methods.fedproto import average_prototypes
from semfl.methods.split_common import assign_encoders, FedCLOptions, float_state, load_float_state, task_loss
from semfl.models.split import SplitEncoder, scg_loss, symbols
from semfl.runtime.checkpoint import read_jsonl
from semfl.runtime.run import Runner


def test_scg_loss_eq9_hand_example():
    F = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # user 0 holds classes 0 and 1, user 1 holds class 2; absent classes carry junk that must not count
    fbar = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [5.0, 5.0]],
                         [[7.0, 7.0], [7.0, 7.0], [0.0, -1.0]]])
    present = torch.tensor([[True, True, False], [False, False, True]])
    # u0,c0: dots (1, 1, 0): log(e^1 + e^0) - 1 = 0.3132617
    # u0,c1: dots (2, 0, 0): log(e^2 + e^0) - 0 = 2.1269280
    # u1,c2: dots (0, -1, 0): log(e^0 + e^-1) - 0 = 0.3132617
    assert float(scg_loss(fbar, present, F)) == pytest.approx(0.3132617 + 2.1269280 + 0.3132617, abs=1e-6)
    assert float(scg_loss(fbar, present, F)) == pytest.approx(
        math.log(math.e + 1) - 1 + math.log(math.e ** 2 + 1) + math.log(1 + math.exp(-1)), abs=1e-6)


def test_fedproto_prototype_average():
    replies = [(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 2]), torch.tensor([1, 3])),
               (torch.tensor([[3.0, 4.0]]), torch.tensor([0]), torch.tensor([3]))]
    protos, present = average_prototypes(replies, 3, weighted=True, dim=2)
    assert present.tolist() == [True, False, True]
    assert protos[0].tolist() == pytest.approx([(1 * 1 + 3 * 3) / 4, (0 + 3 * 4) / 4])
    assert protos[2].tolist() == pytest.approx([0.0, 2.0])
    protos, _ = average_prototypes(replies, 3, weighted=False, dim=2)
    assert protos[0].tolist() == pytest.approx([2.0, 2.0])


def test_encoder_assignment_and_config_errors():
    assert assign_encoders([10, 300, 20, 200, 100, 50], FedCLOptions()) == \
        ["dcgan-s", "dcgan-l", "dcgan-s", "dcgan-l", "dcgan-m", "dcgan-m"]
    assert assign_encoders([1, 2], FedCLOptions(encoder_rule="same", encoder="dcgan-l")) == ["dcgan-l"] * 2
    with pytest.raises(ConfigError, match=r"^fedcl.encoders"):
        load_config(None, ["method=fedavg-split", "users=2", "fedcl.encoders=['dcgan-s', 'dcgan-m']"])
    with pytest.raises(ConfigError, match=r"^fedcl.encoders"):
        load_config(None, ["method=fedcl", "users=3", "fedcl.encoders=['dcgan-s']"])
    with pytest.raises(ConfigError, match=r"^fedcl.batches_per_message"):
        load_config(None, ["method=fedcl", "fedcl.batches_per_message=0"])
    x = torch.randn(2, 1, 28, 28)
    for preset in ("dcgan-s", "dcgan-m", "dcgan-l"):
        assert SplitEncoder(preset, 1, 28, 28, "tiny")(x).shape == (2, 64)


@pytest.fixture(scope="module")
def split_setup(fmnist_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fedcl")
    overrides = [f"data.root={fmnist_root}", f"classifier.cache_dir={tmp / 'cache'}", "scale=tiny",
                 "data.download=false", "data.test_samples=100", "classifier.epochs=1", "eval.snr_sweep=[0.0, 10.0]",
                 "data.partition=ways_shots", "data.shots=30", "users=3", "train.lr=0.05"]
    return overrides, tmp


def make_method(overrides, extra=()):
    return local_method(FedCL, overrides + ["method=fedcl", *extra])


def test_split_gradient_equals_autograd_through_full_model(split_setup):
    """B = 1, noiseless downlink: the gradient the user gets and its encoder step are those of
    autograd through encoder -> channel (same noise draw) -> head."""
    overrides, _ = split_setup
    cfg, run, user_data, transport, method = make_method(overrides, [
        "fedcl.batches_per_message=1", "fedcl.downlink_snr_db=inf", "train.momentum=0", "fedcl.lam=0.05",
        "channel.train_snr=fixed", "channel.snr_db=3.0", "fedcl.encoders=['dcgan-s', 'dcgan-m', 'dcgan-l']"])
    user, lr = 1, cfg.train.lr
    theta0 = {k: v.clone() for k, v in method.encoder_state(transport.states[user], user).items()}
    reply = transport.send([user], "step", Payload())[user]
    f_hat, labels = reply.tensors["features"], reply.tensors["labels"]
    idx = method.round_batches(transport.context(user, "step"))[0]
    assert len(labels) == len(idx) and torch.equal(labels, user_data[user][1][idx])

    # reference: the full model with the same weights and the same channel noise
    reference = SplitEncoder("dcgan-m", 1, 28, 28, "tiny")
    load_float_state(reference, theta0)
    reference.train()
    with torch.no_grad():
        noise = f_hat - symbols(reference(user_data[user][0][idx]))
    head = type(method.head)(10, hidden=cfg.table("fedcl").head_hidden)
    load_float_state(head, method.global_head)
    f_full = symbols(reference(user_data[user][0][idx])) + noise
    present = torch.ones(10, dtype=torch.bool)
    loss, _ = task_loss(head(f_full), labels, f_full, method.centroids, present, cfg.table("fedcl").lam)
    expected_g = torch.autograd.grad(loss, f_full, retain_graph=True)[0]
    loss.backward()

    # base station: one SGD step on the head, gradient w.r.t. the received features
    load_float_state(method.head, method.global_head)
    opt = torch.optim.SGD(method.head.parameters(), lr=lr)
    sums, counts = torch.zeros(10, 64), torch.zeros(10)
    grads, _ = method.server_batches(f_hat, labels, [len(labels)], opt, sums, counts)
    torch.testing.assert_close(grads, expected_g, rtol=1e-4, atol=1e-7)
    assert counts.sum() == len(labels)

    transport.send([user], "step", Payload({"gradients": grads}))
    theta1 = method.encoder_state(transport.states[user], user)
    for name, p in reference.named_parameters():
        torch.testing.assert_close((theta0[name] - theta1[name]) / lr, p.grad, rtol=1e-3, atol=1e-6)


def test_round_aggregates_heads_eq5_and_charges_exact_bits(split_setup):
    overrides, _ = split_setup
    cfg, run, user_data, transport, method = make_method(overrides, ["fedcl.batches_per_message=3",
                                                                    "train.local_epochs=2", "train.batch_size=16"])
    heads, original = {}, method.train_user

    def spy(user, sums, counts):
        loss = original(user, sums, counts)
        heads[user] = float_state(method.head)
        return loss

    method.train_user = spy
    info = method.run_round(1, [0, 1, 2])
    sizes = run.user_sizes
    for name, value in method.global_head.items():
        expected = sum(sizes[k] * heads[k][name].double() for k in heads) / sum(sizes)
        torch.testing.assert_close(value, expected.float(), rtol=1e-5, atol=1e-6)
    assert math.isfinite(info["scg_loss"]) and len(info["user_rows"]) == 3

    uplinks = [t.user for t in run.link.transfers if t.direction == "uplink"]
    links = {r["user"]: r for r in run.link.drain(1)}
    for k in range(3):
        samples = 2 * sizes[k]  # two local epochs
        assert links[k]["uplink_bits"] == samples * (32 * 64 + 64)  # float32 features + int64 labels
        assert links[k]["downlink_bits"] == samples * 32 * 64  # float32 gradients; the first request is empty
        messages = math.ceil(len(batch_sizes(sizes[k], 16, 2)) / 3)
        assert uplinks.count(k) == messages + 1  # + the empty reply to the last gradients


def run_method(overrides, tmp, method, extra=()):
    cfg = load_config(None, overrides + [f"method={method}", "rounds=3", *extra])
    out = tmp / method
    Runner(cfg, out, show_progress=False, log=lambda m: None).execute()
    return read_jsonl(out / "metrics.jsonl"), out


def test_heterogeneous_encoders_train_together(split_setup):
    overrides, tmp = split_setup
    rows, out = run_method(overrides, tmp, "fedcl", ["fedcl.encoders=['dcgan-s', 'dcgan-m', 'dcgan-l']"])
    glob = {r["round"]: r for r in rows if r["scope"] == "global"}
    assert glob[3]["loss"] < glob[0]["loss"]
    assert glob[3]["accuracy"] > 0.6  # users hold 2-4 classes: chance is about 1/3 on their test images
    users = [r for r in rows if r["scope"] == "user" and r["round"] == 3]
    assert {r["encoder"] for r in users} == {"dcgan-s", "dcgan-m", "dcgan-l"}
    assert all("accuracy" in r and "loss" in r for r in users)
    assert (out / "figures" / "features.png").is_file() and (out / "snr_sweep.json").is_file()


@pytest.mark.parametrize("method", ["fedproto", "fedavg-split"])
def test_baselines_learn(split_setup, method):
    overrides, tmp = split_setup
    rows, _ = run_method(overrides, tmp, method)
    glob = {r["round"]: r for r in rows if r["scope"] == "global"}
    assert glob[3]["accuracy"] > 0.6 and glob[3]["accuracy"] > glob[0]["accuracy"]
    if method == "fedproto":
        assert glob[3]["proto_accuracy"] > 0.6
        links = [r for r in rows if r["scope"] == "link" and r["round"] == 2]
        assert all(r["downlink_bits"] == 10 * 64 * 32 + 10 for r in links)  # prototypes + class bitmap


def test_resume_gives_the_uninterrupted_run(split_setup, monkeypatch):
    overrides, tmp = split_setup
    cfg = load_config(None, overrides + ["method=fedcl", "rounds=2", "fedcl.batches_per_message=2"])
    keep = ("round", "scope", "user", "loss", "accuracy", "scg_loss", "uplink_bits")
    whole, resumed = whole_and_resumed(cfg, tmp, monkeypatch, FedCL, "run_round", 2, keep)
    rows = [[r for r in run if r["scope"] != "link"] for run in (whole, resumed)]
    assert rows[0] == rows[1]
