"""FedCL and its baselines on split models: SCG loss, exact split gradients, eq 5, link bits, FedProto."""
from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import local_method, method_group, record_learning_rates, whole_and_resumed
from semfl.wireless.codecs import Payload
from semfl.config import ConfigError, load_config
from semfl.methods.split import common as split_common
from semfl.methods.split.fedavg_split import FedAvgSplit
from semfl.methods.split.fedcl import FedCL, batch_sizes, downlink_generator, downlink_noise, local_centroids
from semfl.methods.split.fedproto import FedProto, average_prototypes
from semfl.methods.split.common import assign_encoders, build_head, FedCLOptions, float_state, load_float_state, task_loss, user_lr
from semfl.training import batches
from semfl.models.split import SplitEncoder, scg_loss, symbols
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner

split_common_transmit = split_common.transmit


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
def split_setup(fmnist_root, tmp_path_factory, shared_cache):
    tmp = tmp_path_factory.mktemp("fedcl")
    overrides = ["log.figures=false", f"data.root={fmnist_root}", f"classifier.cache_dir={shared_cache}", "scale=tiny",
                 "data.download=false", "data.test_samples=100", "classifier.epochs=1", "eval.snr_sweep=[0.0, 10.0]",
                 "data.partition=ways_shots", "data.shots=30", "users=3", "train.lr=0.05"]
    return overrides, tmp


def make_method(overrides, extra=()):
    return local_method(FedCL, overrides + ["method=fedcl", *extra])


@pytest.mark.parametrize("user_lrs, lr", [(None, 0.05), ("[0.05, 0.2, 0.05]", 0.2)])
def test_split_gradient_equals_autograd_through_full_model(split_setup, user_lrs, lr):
    """B = 1, noiseless downlink: the gradient the user gets and its encoder step are those of
    autograd through encoder -> channel (same noise draw) -> head; the step is taken with the
    user's own learning rate eta_k (eq 6, fedcl.user_lrs) when one is set, else train.lr."""
    overrides, _ = split_setup
    cfg, run, user_data, transport, method = make_method(overrides, [
        "fedcl.batches_per_message=1", "fedcl.downlink_snr_db=inf", "train.momentum=0", "fedcl.lam=0.05",
        "channel.train_snr=fixed", "channel.snr_db=3.0", "fedcl.encoders=['dcgan-s', 'dcgan-m', 'dcgan-l']",
        *([f"fedcl.user_lrs={user_lrs}"] if user_lrs else [])])
    user = 1
    assert cfg.train.lr == 0.05
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
    opt = torch.optim.SGD(method.head.parameters(), lr=cfg.train.lr)
    sums, counts = torch.zeros(10, 64), torch.zeros(10)
    grads, _ = method.server_batches(f_hat, labels, [len(labels)], opt, sums, counts, torch.Generator())
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

    def spy(user, sums, counts, round_):
        loss = original(user, sums, counts, round_)
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
    rows, out = run_method(overrides, tmp, "fedcl", ["fedcl.encoders=['dcgan-s', 'dcgan-m', 'dcgan-l']", "log.figures=true"])
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


# ---------------------------------------------------------------- config errors name their field
@pytest.mark.parametrize("override, field", [
    ("fedcl.head_lr=-1", "fedcl.head_lr"),
    ("fedcl.user_lrs=[0.1, 0.0, 0.1]", "fedcl.user_lrs"),
    ("fedcl.scg_lr=0", "fedcl.scg_lr"),
    ("fedcl.scg_steps=-1", "fedcl.scg_steps"),
    ("fedcl.feature_samples=-1", "fedcl.feature_samples"),
    ("fedcl.scg_hidden=0", "fedcl.scg_hidden"),
    ("fedcl.head_hidden=0", "fedcl.head_hidden"),
    ("fedcl.encoder='foo'", "fedcl.encoder"),
    ("fedcl.encoders=['dcgan-s', 'foo', 'dcgan-m']", "fedcl.encoders"),
    ("fedcl.downlink_snr_db=-inf", "fedcl.downlink_snr_db"),
    ("fedcl.downlink_snr_db=nan", "fedcl.downlink_snr_db"),
])
def test_config_errors_name_the_offending_field(override, field):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}:"):
        load_config(None, ["method=fedcl", "users=3", override])


def test_downlink_snr_accepts_plus_inf_and_finite_values():
    assert load_config(None, ["method=fedcl", "fedcl.downlink_snr_db=inf"]).table("fedcl").downlink_snr_db == math.inf
    assert load_config(None, ["method=fedcl", "fedcl.downlink_snr_db=-5.0"]).table("fedcl").downlink_snr_db == -5.0


# ---------------------------------------------------------------- downlink noise
def test_downlink_noise_variance_is_gradient_power_over_snr():
    g = torch.randn(400, 64, generator=torch.Generator().manual_seed(3)) * 0.01 + 0.002
    power = float(g.pow(2).mean())
    for snr_db in (0.0, 10.0, 20.0):
        noise = downlink_noise(g, snr_db, downlink_generator(0, 1, 2, 0)) - g
        # 25600 i.i.d. draws: the sample variance is within ~1 % (1 sigma) of the true one
        assert float(noise.pow(2).mean()) == pytest.approx(power / 10 ** (snr_db / 10), rel=0.05)
        assert abs(float(noise.mean())) < 4 * math.sqrt(power / 10 ** (snr_db / 10) / noise.numel())
    assert torch.equal(downlink_noise(g, math.inf, torch.Generator()), g)  # noiseless
    # a pure function of its generator: same seed parts, same noise; another message, other noise
    a, b = (downlink_noise(g, 10.0, downlink_generator(0, 1, 2, m)) for m in (0, 0))
    assert torch.equal(a, b)
    assert not torch.equal(a, downlink_noise(g, 10.0, downlink_generator(0, 1, 2, 1)))


def server_gradients(method, features, labels, sizes, generator):
    """server_batches from the global head with a fresh head optimiser (the head steps do not depend
    on the downlink noise)."""
    load_float_state(method.head, method.global_head)
    opt = torch.optim.SGD(method.head.parameters(), lr=method.cfg.train.lr)
    classes = len(method.centroids)
    grads, _ = method.server_batches(features, labels, sizes, opt, torch.zeros(classes, 64), torch.zeros(classes),
                                     generator)
    return grads


def test_server_adds_downlink_noise_of_the_configured_snr(split_setup):
    overrides, _ = split_setup
    *_, method = make_method(overrides, ["fedcl.downlink_snr_db=10.0"])
    gen = torch.Generator().manual_seed(5)
    features, labels = torch.randn(192, 64, generator=gen), torch.randint(0, 10, (192,), generator=gen)
    features[128:] *= 4  # the last mini-batch's features (and gradients) far stronger than the others'
    sizes = [64, 64, 64]
    noisy = server_gradients(method, features, labels, sizes, downlink_generator(0, 1, 0, 0))
    method.options.downlink_snr_db = math.inf
    clean = server_gradients(method, features, labels, sizes, downlink_generator(0, 1, 0, 0))
    method.options.downlink_snr_db = 10.0
    # per mini-batch: noise variance mean(g_b^2) / 10 (the SNR is relative to each mini-batch's power,
    # not the whole set's, which the unequal powers tell apart)
    powers = [float(c.pow(2).mean()) for c in clean.split(sizes)]
    assert max(powers) > 2 * min(powers)
    for c, n, power in zip(clean.split(sizes), (noisy - clean).split(sizes), powers):
        # 4096 draws: the noise power's relative sd is sqrt(2 / 4096) = 2.2 %; 5 sigma
        assert float(n.pow(2).mean()) == pytest.approx(power / 10, rel=0.11)


def test_downlink_noise_does_not_depend_on_the_global_rng(split_setup):
    overrides, _ = split_setup
    *_, method = make_method(overrides, ["fedcl.downlink_snr_db=10.0"])
    gen = torch.Generator().manual_seed(6)
    features, labels = torch.randn(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    out = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        out.append(server_gradients(method, features, labels, [32, 32], downlink_generator(0, 1, 0, 0)))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    method.options.downlink_snr_db = math.inf
    assert not torch.equal(out[0], server_gradients(method, features, labels, [32, 32], torch.Generator()))


def test_round_does_not_depend_on_what_users_do_to_the_global_rng(split_setup):
    """With Flower each user handler runs in its node's process and leaves the base station's global
    RNG alone; with the local transport it runs in the same process. Scrambling the global RNG after
    every user reply must not change the round (the downlink noise has its own generators)."""
    overrides, _ = split_setup
    extra = ["fedcl.downlink_snr_db=5.0", "fedcl.batches_per_message=2", "train.batch_size=16"]
    results = []
    for scramble in (False, True):
        *_, transport, method = make_method(overrides, extra)
        if scramble:
            original, calls = transport.send, [0]

            def send(*args, original=original, calls=calls, **kwargs):
                replies = original(*args, **kwargs)
                calls[0] += 1
                torch.manual_seed(1000 + calls[0])
                torch.rand(calls[0])
                return replies

            transport.send = send
        method.run_round(1, [0, 1])
        results.append((method.global_head, [method.encoder_state(transport.states[k], k) for k in (0, 1)]))
    for name, value in results[0][0].items():
        torch.testing.assert_close(results[1][0][name], value, rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        for name, value in a.items():
            torch.testing.assert_close(b[name], value, rtol=0, atol=0)


# ---------------------------------------------------------------- SCG and centroids (eqs 7-10)
def test_update_scg_decreases_the_scg_loss(split_setup):
    overrides, _ = split_setup
    *_, method = make_method(overrides, ["fedcl.scg_steps=20", "fedcl.scg_lr=0.01"])
    gen = torch.Generator().manual_seed(7)
    fbar = torch.randn(3, 10, 64, generator=gen)
    present = torch.rand(3, 10, generator=gen) < 0.6
    before = float(scg_loss(fbar, present, method.centroids))
    assert method.update_scg(fbar, present) == pytest.approx(before, rel=1e-6)  # the loss before the first step
    after = float(scg_loss(fbar, present, method.centroids))
    assert after < before - 0.05 * abs(before)


def test_local_centroids_eq7_are_class_means_hand_example():
    # two users, three classes, 2-d features: user 0 saw class 0 twice and class 2 once, user 1 class 1 four times
    f0 = torch.tensor([[1.0, 2.0], [3.0, 6.0], [-1.0, 0.5]])
    f1 = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0], [6.0, 5.0]])
    sums, counts = torch.zeros(2, 3, 2), torch.zeros(2, 3)
    sums[0].index_add_(0, torch.tensor([0, 0, 2]), f0)
    counts[0] += torch.tensor([2.0, 0.0, 1.0])
    sums[1].index_add_(0, torch.tensor([1, 1, 1, 1]), f1)
    counts[1] += torch.tensor([0.0, 4.0, 0.0])
    means, present = local_centroids(sums, counts)
    assert present.tolist() == [[True, False, True], [False, True, False]]
    assert means[0].tolist() == [[2.0, 4.0], [0.0, 0.0], [-1.0, 0.5]]
    assert means[1].tolist() == [[0.0, 0.0], [3.0, 2.0], [0.0, 0.0]]


def test_round_feeds_the_scg_the_class_means_of_the_received_features(split_setup):
    overrides, _ = split_setup
    *_, method = make_method(overrides, ["fedcl.batches_per_message=4", "train.batch_size=16", "train.local_epochs=2"])
    seen: dict[int, list] = {}
    current = []
    train_user, server_batches, update_scg = method.train_user, method.server_batches, method.update_scg

    def spy_user(user, *args):
        current.append(user)
        return train_user(user, *args)

    def spy_batches(features, labels, *args):
        seen.setdefault(current[-1], []).append((features.clone(), labels.clone()))
        return server_batches(features, labels, *args)

    got = {}

    def spy_scg(fbar, present):
        got.update(fbar=fbar.clone(), present=present.clone())
        return update_scg(fbar, present)

    method.train_user, method.server_batches, method.update_scg = spy_user, spy_batches, spy_scg
    users = [2, 0]
    method.run_round(1, users)
    for i, user in enumerate(users):
        f = torch.cat([a for a, _ in seen[user]])
        y = torch.cat([b for _, b in seen[user]])
        for c in range(10):
            assert bool(got["present"][i, c]) == bool((y == c).any())
            if (y == c).any():
                torch.testing.assert_close(got["fbar"][i, c], f[y == c].mean(0), rtol=1e-5, atol=1e-6)


def test_eq10_regulariser_is_squared_norm_summed_over_dims_hand_example():
    logits = torch.zeros(2, 2)  # CE = log 2 for every sample
    labels = torch.tensor([0, 1])
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    centroids = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # ||f - F^y||^2: 1 + 4 = 5 and 4 + 9 = 13, mean over the batch 9
    loss, ce = task_loss(logits, labels, features, centroids, torch.tensor([True, True]), 0.5)
    assert float(ce) == pytest.approx(math.log(2))
    assert float(loss) == pytest.approx(math.log(2) + 0.5 * 9)
    # a class without a centroid contributes no regulariser (the batch mean still counts its samples)
    loss, _ = task_loss(logits, labels, features, centroids, torch.tensor([True, False]), 0.5)
    assert float(loss) == pytest.approx(math.log(2) + 0.5 * 5 / 2)
    loss, _ = task_loss(logits, labels, features, centroids, torch.tensor([True, True]), 0.0)
    assert float(loss) == pytest.approx(math.log(2))


# ---------------------------------------------------------------- baselines
def test_fedproto_local_loss_is_ce_plus_lam_times_mse_by_hand(split_setup, monkeypatch):
    """One local step (batch >= data, one epoch): the reported loss is that of the initial weights,
    CE + lam * mean over samples and the 64 dims of (f_hat - prototype of its class)^2, the MSE of
    FedProto (= eq 10's squared norm / 64), for the classes that have a prototype."""
    overrides, _ = split_setup
    cfg, run, user_data, transport, method = local_method(FedProto, overrides + [
        "method=fedproto", "fedproto.lam=0.5", "train.batch_size=1000", "train.local_epochs=1"])
    user = 0
    initial: dict = {}
    method.user_models(initial, user)  # the user's initial weights (deterministic per user)
    received = []

    def recording_transmit(*args, **kwargs):
        out = split_common_transmit(*args, **kwargs)
        received.append(out.detach().clone())
        return out

    monkeypatch.setattr(split_common, "transmit", recording_transmit)
    gen = torch.Generator().manual_seed(8)
    prototypes = 2 * torch.randn(10, 64, generator=gen)
    x, y = user_data[user]
    held = torch.unique(y)
    present = torch.ones(10, dtype=torch.bool)
    present[held[0]] = False  # one of the user's classes has no global prototype
    reply = transport.send([user], "train", Payload({"prototypes": prototypes, "present": present}))[user]
    assert len(received) == 1
    f_hat = received[0]
    (idx,) = list(batches(len(y), 1000, transport.context(user, "train").generator("batches")))
    labels = y[idx]
    head = build_head(run)
    load_float_state(head, initial["head"])
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(head(f_hat), labels)
        mse = (((f_hat - prototypes[labels]) ** 2).mean(1) * present[labels].float()).mean()
    assert float(mse) > 1.0  # the regulariser matters
    assert reply.meta["loss"] == pytest.approx(float(ce + 0.5 * mse), rel=1e-5)


def fake_replies(replies):
    """A transport.send stand-in: hands the given (user, num_samples, value) replies to on_reply,
    every tensor of the request filled with value."""
    def send(users, kind, payload, on_reply=None):
        for user, n, value in replies:
            on_reply(user, Payload({k: torch.full_like(v, value) for k, v in payload.tensors.items()},
                                   meta={"num_samples": n, "loss": 0.0}))
        return {}
    return send


def test_fedavg_split_averages_by_data_size_hand_example(split_setup):
    overrides, _ = split_setup
    *_, method = local_method(FedAvgSplit, overrides + ["method=fedavg-split"])
    method.transport.send = fake_replies([(0, 1, 0.0), (1, 3, 2.0)])
    method.run_round(1, [0, 1])
    for name, value in method.global_state.items():
        assert torch.all(value == 1.5), name  # (1 * 0 + 3 * 2) / 4; uniform would give 1


def test_fedavg_split_round_weights_users_by_their_data_size(split_setup):
    overrides, _ = split_setup
    *_, run, _, transport, method = local_method(FedAvgSplit, overrides + ["method=fedavg-split"])
    sizes = run.user_sizes
    assert len(set(sizes)) == len(sizes)  # the weighting is visible
    uploads = {}
    original = transport.send

    def send(users, kind, payload, on_reply=None):
        def record(user, reply):
            uploads[user] = {k: v.clone() for k, v in reply.tensors.items()}
            on_reply(user, reply)
        return original(users, kind, payload, on_reply=record)

    transport.send = send
    method.run_round(1, [0, 1, 2])
    for name, value in method.global_state.items():
        expected = sum(sizes[k] * uploads[k][name].double() for k in uploads) / sum(sizes)
        torch.testing.assert_close(value, expected.float(), rtol=1e-5, atol=1e-6)


def test_user_lrs_set_each_users_learning_rate(split_setup, monkeypatch):
    overrides, _ = split_setup
    extra = ["fedcl.user_lrs=[0.01, 0.02, 0.03]", "fedcl.encoder_rule=same"]
    cfg = load_config(None, overrides + ["method=fedcl", *extra])
    assert [user_lr(cfg, k) for k in range(3)] == [0.01, 0.02, 0.03]
    assert user_lr(load_config(None, overrides + ["method=fedcl"]), 1) == 0.05  # train.lr
    seen = record_learning_rates(monkeypatch, [split_common])  # local_train_split's optimisers
    for cls, name in ((FedProto, "fedproto"), (FedAvgSplit, "fedavg-split")):
        *_, method = local_method(cls, overrides + [f"method={name}", *extra])
        seen.clear()
        method.run_round(1, [2, 0, 1])
        assert seen == [0.03, 0.01, 0.02], name


@pytest.mark.parametrize("method", method_group(["fedcl", "fedproto", "fedavg-split", "fedavg"]))
def test_summary_names_the_model_the_method_trains(method_run, method):
    """Reports (semfl verify's groups table) name the model from summary.json: the split family's
    encoders come from [fedcl], not from model.arch (csc), which it does not use."""
    import json

    *_, out = method_run(method)
    expected = {"fedcl": "dcgan-s/m/l by data size", "fedproto": "dcgan-s/m/l by data size",
                "fedavg-split": "dcgan-m", "fedavg": "csc"}[method]
    assert json.loads((out / "summary.json").read_text())["model"] == expected
