"""FineFed: pair topology, the model's two halves, exact encoder/decoder phases against autograd,
exact relay bits, config errors and a whole run whose pair models beat the federated model."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conftest import local_method, whole_and_resumed
from semfl.wireless.codecs import Payload
from semfl.wireless.codecs.base import META_BITS
from semfl.config import ConfigError, load_config
from semfl.methods.common import build_semantic_model
from semfl.methods.finefed import FineFed, receivers_of, senders_of
from semfl.protocol import seeding
from semfl.files import read_jsonl
from semfl.runtimes.local import LocalTransport
from semfl.runtimes.run import Runner, build_context
from semfl.metrics import psnr_per_image
from semfl.training import load_weights, snr_tensor


def test_receivers_follow_the_authors_topology_and_never_include_the_sender():
    assert [receivers_of(i, 10, 2) for i in range(3)] == [[5, 6], [6, 7], [7, 8]]
    assert receivers_of(9, 10, 2) == [4, 5]
    assert senders_of(5, 10, 2) == [0, 9]
    assert [receivers_of(i, 3, 2) for i in range(3)] == [[1, 2], [2, 0], [0, 1]]
    assert receivers_of(0, 2, 2) == [1] and receivers_of(1, 2, 5) == [0]
    for k in (2, 3, 7, 10):
        for i in range(k):
            r = receivers_of(i, k, 3)
            assert i not in r and len(set(r)) == len(r) == min(3, k - 1)


@pytest.mark.parametrize("arch", ["jscc", "csc"])
def test_halves_partition_the_model_and_compose_to_its_forward(arch):
    cfg = load_config(None, ["scale=tiny", f"model.arch={arch}"])
    from semfl.wireless.channel import make_channel
    from semfl.models import ImageSpec, build_model

    model = build_model(arch, "tiny", ImageSpec(1, 28, 28, 10), make_channel(cfg.channel))
    names = [n for n, _ in model.named_parameters()]
    sender = [n for n in names if n.startswith(model.sender_prefixes)]
    receiver = [n for n in names if n.startswith(model.receiver_prefixes)]
    assert sorted(sender + receiver) == sorted(names) and not set(sender) & set(receiver)
    x = torch.rand(4, 1, 28, 28)
    snr = snr_tensor(8.0, 4, x.device)
    seeding.enter(3)  # torch's and Sionna's generators: the same channel noise twice
    whole = model(x, snr).recon
    seeding.enter(3)
    split = model.reconstruct(model.channel(model.transmit_symbols(x), snr))
    torch.testing.assert_close(split, whole)


@pytest.fixture(scope="module")
def base(fmnist_root, tmp_path_factory, shared_cache):
    tmp = tmp_path_factory.mktemp("finefed")
    return ["log.figures=false", f"data.root={fmnist_root}", f"classifier.cache_dir={shared_cache}", "scale=tiny", "data.download=false",
            "data.test_samples=100", "classifier.epochs=1", "eval.snr_sweep=[]", "users=3", "model.arch=jscc",
            "method=finefed", "data.partition=iid", "data.max_per_user=40"], tmp


def make_method(overrides):
    cfg, run, user_data, transport, method = local_method(FineFed, overrides, round_=2)
    transport.send(range(cfg.users), "personalise", Payload(method.global_weights, codec="dense"))
    method.personalised = True
    return cfg, run, user_data, method, transport


# a channel this clean adds nothing a float32 symbol can hold, so autograd without it is the reference
EXACT = ["finefed.batches_per_message=1", "train.batch_size=64", "channel.train_snr=fixed", "channel.snr_db=300",
         "finefed.lr=0.001"]


def shard(x, k):
    return x[k::2]  # each user has two receivers: interleaved shards 0 and 1


def perturb_decoders(method, transport, receivers, scale=0.05):
    """Give each receiver its own decoder D_j (federated + seeded noise, different per j)."""
    for j in receivers:
        gen = torch.Generator().manual_seed(100 + j)
        transport.states[j]["receiver"] = {k: v + scale * torch.randn(v.shape, generator=gen)
                                           for k, v in transport.states[j]["receiver"].items()}


def test_encoder_phase_is_one_adam_step_on_the_summed_pair_losses(base):
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + EXACT)
    sender = 0
    receivers = method.receivers[sender]
    assert receivers == [1, 2]
    # every receiver has its own decoder (as after a decoder phase): each pair's gradient must come
    # from that receiver's D_j, not from the federated decoder or another receiver's
    perturb_decoders(method, transport, receivers)
    decoders = {j: {k: v.clone() for k, v in transport.states[j]["receiver"].items()} for j in receivers}
    method.encoder_phase(sender, receivers)

    reference = build_semantic_model(run, "jscc")
    load_weights(reference, method.global_weights)
    params = [p for n, p in reference.named_parameters() if n.startswith(reference.sender_prefixes)]
    receiving = {}
    for j in receivers:
        receiving[j] = build_semantic_model(run, "jscc")
        load_weights(receiving[j], {**method.global_weights, **decoders[j]})
        receiving[j].requires_grad_(False)
    x = user_data[sender][0]
    loss = sum(F.mse_loss(receiving[j].reconstruct(reference.transmit_symbols(shard(x, k))), shard(x, k))
               for k, j in enumerate(receivers))
    opt = torch.optim.Adam(params, lr=1e-3)
    loss.backward()
    opt.step()
    got = transport.states[sender]["sender"]
    for name, p in reference.named_parameters():
        if name.startswith(reference.sender_prefixes):
            torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-7)
            assert not torch.equal(got[name], method.global_weights[name])  # it did move
    for j in receivers:  # the receivers' decoders stay fixed in the encoder phase
        assert transport.states[j]["receiver"].keys() == {n for n in method.global_weights
                                                          if n.startswith(reference.receiver_prefixes)}
        for k, v in decoders[j].items():
            assert torch.equal(transport.states[j]["receiver"][k], v)


def test_decoder_phase_is_one_adam_step_on_the_union_of_its_senders(base):
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + EXACT + ["train.batch_size=128"])
    for i in range(3):
        method.encoder_phase(i, method.receivers[i])
    receiver = 0
    senders = method.senders[receiver]
    assert senders == [1, 2]
    method.decoder_phase(receiver, senders)

    reference = build_semantic_model(run, "jscc")
    load_weights(reference, method.global_weights)
    images, symbols = [], []
    for i in senders:
        load_weights(reference, transport.states[i]["sender"])  # the senders' fine-tuned encoders, fixed
        part = shard(user_data[i][0], method.receivers[i].index(receiver))
        with torch.no_grad():
            symbols.append(reference.transmit_symbols(part))
        images.append(part)
    load_weights(reference, method.global_weights)
    params = [p for n, p in reference.named_parameters() if n.startswith(reference.receiver_prefixes)]
    opt = torch.optim.Adam(params, lr=1e-3)
    F.mse_loss(reference.reconstruct(torch.cat(symbols)), torch.cat(images)).backward()
    opt.step()
    got = transport.states[receiver]["receiver"]
    for name, p in reference.named_parameters():
        if name.startswith(reference.receiver_prefixes):
            torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-7)


def test_relay_charges_every_hop_exactly(base):
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + EXACT)
    run.link.drain(2)  # forget the personalise broadcast
    method.encoder_phase(0, [1, 2])
    links = {r["user"]: r for r in run.link.drain(2)}
    symbols = build_semantic_model(run, "jscc").transmit_symbols(user_data[0][0][:1]).shape[1]
    n = {j: len(shard(user_data[0][0], k)) for k, j in enumerate([1, 2])}
    y_bits = {j: n[j] * symbols * 2 * 32 for j in n}  # float32 real and imaginary parts
    x_bits = {j: n[j] * 28 * 28 * 8 for j in n}  # 8-bit pixels
    # sender: one message of symbols + images (+ one batch size per pair), then an empty reply
    assert links[0]["uplink_bits"] == sum(y_bits[j] + x_bits[j] + META_BITS for j in n)
    # sender downlink: the first request names the 2 receivers; the second carries their gradients too
    assert links[0]["downlink_bits"] == 2 * 2 * META_BITS + sum(y_bits.values())
    for j in n:  # relayed symbols + images + batch size down, the gradient + its loss up
        assert links[j]["downlink_bits"] == y_bits[j] + x_bits[j] + META_BITS
        assert links[j]["uplink_bits"] == y_bits[j] + META_BITS


def test_config_errors_name_the_field(base):
    overrides, _ = base
    with pytest.raises(ConfigError, match=r"^users"):
        load_config(None, ["method=finefed", "users=1"])
    with pytest.raises(ConfigError, match=r"^finefed.fedavg_rounds"):
        load_config(None, ["method=finefed", "rounds=3", "finefed.fedavg_rounds=4"])
    with pytest.raises(ConfigError, match=r"^finefed.receivers: must be at most users - 1 \(2"):
        load_config(None, ["method=finefed", "users=3", "finefed.receivers=3"])  # was silently clipped to 2
    with pytest.raises(ConfigError, match=r"^finefed.receivers"):
        load_config(None, ["method=finefed", "users=3", "finefed.receivers=0"])
    assert load_config(None, ["method=finefed", "users=3", "finefed.receivers=2"]).table("finefed").receivers == 2
    load_config(None, ["method=fedavg", "users=2"])  # the finefed table's default only binds finefed runs
    with pytest.raises(ConfigError, match=r"^finefed.batches_per_message"):
        load_config(None, ["method=finefed", "finefed.batches_per_message=0"])
    with pytest.raises(ConfigError, match=r"^train.precision"):
        load_config(None, ["method=finefed", "train.precision=bf16"])
    cfg = load_config(None, overrides + ["model.arch=gsc-m"])
    run, user_data = build_context(cfg, None, log=lambda m: None)
    with pytest.raises(ConfigError, match=r"^model.arch"):
        FineFed(run, LocalTransport(run.link, user_data, cfg.seed, run.device, handlers={}))


def test_fine_tuned_pairs_beat_the_federated_model(base):
    overrides, tmp = base
    cfg = load_config(None, overrides + ["rounds=6", "finefed.fedavg_rounds=3", "finefed.lr=0.003",
                                         "train.optimizer=adam", "train.lr=0.003", "train.task_weight=0",
                                         "data.max_per_user=120", "finefed.train_snrs=[4.0, 10.0]", "log.figures=true"])
    out = tmp / "run"
    Runner(cfg, out, show_progress=False, log=lambda m: None).execute()
    rows = read_jsonl(out / "metrics.jsonl")
    glob = {r["round"]: r for r in rows if r["scope"] == "global"}
    assert [glob[r]["stage"] for r in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    assert "federated_psnr_db" not in glob[3] and glob[6]["pairs"] == 6
    assert glob[6]["psnr_db"] > glob[6]["federated_psnr_db"] + 0.1
    users = [r for r in rows if r["scope"] == "user" and r["round"] == 6]
    assert [r["receivers"] for r in users] == ["1,2", "2,0", "0,1"]
    assert all(r["decoder_loss"] > 0 and r["encoder_loss"] > 0 for r in users)
    assert (out / "figures" / "reconstructions.png").is_file() and (out / "report.html").is_file()


def test_killed_in_stage_two_resumes_to_the_uninterrupted_run(base, monkeypatch):
    overrides, tmp = base
    cfg = load_config(None, overrides + ["rounds=2", "finefed.fedavg_rounds=1", "finefed.batches_per_message=1",
                                         "train.batch_size=16"])
    keep = ("round", "scope", "user", "loss", "psnr_db", "encoder_loss", "decoder_loss", "uplink_bits", "downlink_bits")
    # killed in the first stage-2 round, after its encoder phase changed the users' encoders
    rows = whole_and_resumed(cfg, tmp, monkeypatch, FineFed, "decoder_phase", 2, keep)
    assert rows[0] == rows[1]


def test_a_pair_without_samples_is_skipped(base):
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + EXACT)
    x, y = user_data[1]
    user_data[1] = (x[:1], y[:1])  # one sample, two receivers: the pair 1 -> R(1)[1] has none
    transport.user_data = user_data
    empty = method.receivers[1][1]
    assert method.encoder_phase(1, method.receivers[1]) is not None
    assert method.decoder_phase(empty, [1]) is None  # nothing to fine-tune on from this sender


# an evaluation channel this clean is deterministic: the reconstructions can be recomputed by hand
EVAL_EXACT = ["eval.snr_db=300", "eval.batch_size=32"]  # 100 test images: batches of 32, 32, 32 and 4


def hand_psnrs(run, weights):
    """(batch PSNR on the 0-255 scale from the whole test set's MSE, mean of per-image PSNR), by hand."""
    model = build_semantic_model(run, "jscc")
    load_weights(model, weights)
    model.eval()
    with torch.no_grad():
        recon = model(run.test_x, snr_tensor(300.0, len(run.test_x), run.test_x.device)).recon
    mse_255 = ((recon.double() * 255 - run.test_x.double() * 255) ** 2).mean()
    per_batch = [((recon[s:s + 32].double() - run.test_x[s:s + 32].double()) ** 2).mean() for s in range(0, 100, 32)]
    return {"batch": float(10 * torch.log10(255.0 ** 2 / mse_255)),
            "per_image": float(psnr_per_image(recon, run.test_x).clamp(max=100).mean()),
            "mean_of_batches": float(10 * torch.log10(1 / torch.stack(per_batch).mean()))}


def test_batch_psnr_is_the_papers_whole_set_mse_on_the_0_255_scale(base):
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + EXACT + EVAL_EXACT)
    assert len(run.test_x) == 100
    # test images of very different contrast around mid-grey (an untrained decoder's output): very
    # different per-image errors, so that the mean of per-image PSNR and the mean of the eval batches'
    # MSE are both far from the PSNR of the whole set's MSE
    contrast = torch.linspace(0.02, 1.0, 100, device=run.test_x.device).view(-1, 1, 1, 1)
    run.test_x = 0.5 + (run.test_x - 0.5) * contrast
    perturb_decoders(method, transport, range(3), scale=0.02)  # distinct pairs
    rows = method.evaluate(2)
    glob, users = rows[0], {r["user"]: r for r in rows[1:]}
    halves = method.personal_halves()
    fed = hand_psnrs(run, method.global_weights)
    pairs = {(i, j): hand_psnrs(run, method.pair_weights(halves, i, j)) for i in range(3) for j in method.receivers[i]}
    close = dict(rel=1e-5, abs=1e-6)
    for i in range(3):
        mine = [pairs[i, j] for j in method.receivers[i]]
        assert users[i]["psnr_batch_db"] == pytest.approx(sum(p["batch"] for p in mine) / 2, **close)
        assert users[i]["psnr_db"] == pytest.approx(sum(p["per_image"] for p in mine) / 2, **close)  # unchanged
    batch = sum(p["batch"] for p in pairs.values()) / 6
    assert glob["pairs"] == 6
    assert glob["psnr_batch_db"] == pytest.approx(batch, **close)
    assert glob["federated_psnr_batch_db"] == pytest.approx(fed["batch"], **close)
    assert glob["federated_psnr_db"] == pytest.approx(fed["per_image"], **close)
    assert glob["psnr_batch_gain_pct"] == pytest.approx(100 * (batch / fed["batch"] - 1), rel=1e-4, abs=1e-6)
    per_image = sum(p["per_image"] for p in pairs.values()) / 6
    assert glob["psnr_db"] == pytest.approx(per_image, **close)  # the mean over the 6 pairs, as the users' rows
    assert glob["psnr_gain_pct"] == pytest.approx(100 * (per_image / fed["per_image"] - 1), rel=1e-4, abs=1e-6)
    # the definitions it must not be: the mean of per-image PSNR, or the mean of the eval batches' MSE
    for p in [fed, *pairs.values()]:
        assert abs(p["batch"] - p["per_image"]) > 0.1 and abs(p["batch"] - p["mean_of_batches"]) > 0.01
    # stage 1: the federated model's row carries the batch PSNR too
    method.personalised = False
    (stage_one,) = method.evaluate(1)
    assert stage_one["psnr_batch_db"] == pytest.approx(fed["batch"], **close) and "pairs" not in stage_one


def test_evaluation_skips_users_whose_state_cannot_be_fetched(base):
    overrides, _ = base
    cfg, run, user_data, method, transport = make_method(overrides + EXACT)
    fetch, gone = transport.fetch_state, set()
    transport.fetch_state = lambda user, keys: None if user in gone else fetch(user, keys)  # a Flower node gone
    gone.add(2)
    glob, *users = method.evaluate(2)
    assert glob["pairs"] == 2 and [(r["user"], r["receivers"]) for r in users] == [(0, "1"), (1, "0")]
    gone.update({0, 1})  # nobody answers: the federated model's metrics, no pair means, no error
    rows = method.evaluate(2)
    assert len(rows) == 1 and rows[0]["scope"] == "global" and rows[0]["pairs"] == 0
    assert {"federated_psnr_db", "federated_psnr_batch_db", "federated_ssim", "federated_loss"} <= rows[0].keys()
    assert not {"psnr_db", "psnr_batch_db", "psnr_gain_pct", "loss"} & rows[0].keys()
