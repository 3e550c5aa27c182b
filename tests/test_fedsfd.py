"""FedSFD (FedSFR's feature-distillation baseline): the middle part, exact pair bits, distillation that
moves only the middle, the base station's fit, resume and a whole run."""
from __future__ import annotations

import pytest
import torch

from conftest import local_method, record_learning_rates, vq_overrides, whole_and_resumed
from semfl.wireless.codecs import Payload
from semfl.wireless.codecs.base import META_BITS
from semfl.config import ConfigError, load_config
from semfl.methods.fedsfr.fedsfd import MIDDLE_PREFIXES, FedSFD, middle
from semfl.files import read_jsonl


@pytest.fixture
def base(fmnist_root, tmp_path, shared_cache):
    extra = ["eval.grid_images=0", "fedsfd.pairs=10"]
    return vq_overrides(fmnist_root, shared_cache, "fedsfd", users=3) + extra, tmp_path


def test_the_middle_is_the_decoder_up_to_the_intermediate_feature(base):
    overrides, _ = base
    cfg, run, user_data, transport, method = local_method(FedSFD, overrides)
    model = method.model
    x = user_data[0][0][:4]
    with torch.no_grad():
        codewords = model.quantize(model.features(x))
        recon = model.decode_codewords(codewords)
        # the rest of the decoder applied to the middle's output gives the whole decoder's output
        torch.testing.assert_close(model.decoder[2:](middle(model, codewords)), recon)
        server = method.server_middle(codewords)
    assert server.shape == middle(model, codewords).shape
    assert sum(p.numel() for p in method.server.parameters()) > sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(MIDDLE_PREFIXES))


def test_pairs_on_the_link_and_distillation_moves_only_the_middle(base):
    overrides, _ = base
    cfg, run, user_data, transport, method = local_method(FedSFD, overrides)
    replies = transport.send([0, 1], "train", Payload(codec="dense"))
    links = {r["user"]: r for r in run.link.drain(1)}
    model = method.model
    vectors, fmap = model.tokens * model.symbols_per_token, replies[0].tensors["targets"].shape[1:]
    for user, reply in replies.items():
        assert reply.tensors["indices"].shape == (10, vectors) and reply.tensors["indices"].dtype == torch.uint8
        assert reply.tensors["targets"].shape == (10, *fmap)
        expected = 10 * vectors * 8 + 10 * fmap.numel() * 32 + META_BITS * len(reply.meta)
        assert links[user]["uplink_bits"] == expected, "8-bit indices + 32-bit features + meta"
    # the downlink carries the base station's pairs at the same per-pair cost
    knowledge = {"indices": replies[0].tensors["indices"], "targets": torch.rand(10, *fmap)}
    transport.round = 2
    reply = transport.send([1], "train", Payload(knowledge, codec="dense", codecs={"indices": "index8"}))[1]
    links = {r["user"]: r for r in run.link.drain(2)}
    assert links[1]["downlink_bits"] == 10 * vectors * 8 + 10 * fmap.numel() * 32
    assert reply.meta["distill_loss"] > 0
    # the distillation step alone moves the middle's parameters and nothing else
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    first = method.distill_middle(knowledge, torch.Generator().manual_seed(0))
    moved = {k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())}
    assert moved == {k for k in before if k.startswith(MIDDLE_PREFIXES)}
    for _ in range(20):
        last = method.distill_middle(knowledge, torch.Generator().manual_seed(0))
    assert last < first  # it fits the targets


def test_the_base_station_fits_its_middle_to_the_users_pairs(base):
    overrides, _ = base
    cfg, run, user_data, transport, method = local_method(FedSFD, overrides + ["fedsfd.server_epochs=5",
                                                                              "fedsfd.server_lr=0.01"])
    first = method.run_round(1, [0, 1, 2])
    transport.round = 2
    second = method.run_round(2, [0, 1, 2])
    assert first["pairs"] == second["pairs"] == 30
    assert second["server_distill_loss"] < first["server_distill_loss"]
    assert method.knowledge["indices"].shape[0] == 30
    assert all("distill_loss" in r for r in second["user_rows"]) and not any("distill_loss" in r for r in first["user_rows"])


def test_config_errors_name_the_field(base):
    with pytest.raises(ConfigError, match=r"^model.arch: fedsfd"):
        load_config(None, ["method=fedsfd"])
    with pytest.raises(ConfigError, match=r"^fedsfd.pairs"):
        load_config(None, ["method=fedsfd", "model.arch=vq-jscc", "fedsfd.pairs=0"])
    with pytest.raises(ConfigError, match=r"^fedsfd.server_width"):
        load_config(None, ["method=fedsfd", "model.arch=vq-jscc", "fedsfd.server_width=0"])
    # 0 epochs would broadcast the untrained base-station middle's outputs as distillation targets
    for epochs in (0, -1):
        with pytest.raises(ConfigError, match=r"^fedsfd.server_epochs: must be >= 1"):
            load_config(None, ["method=fedsfd", "model.arch=vq-jscc", f"fedsfd.server_epochs={epochs}"])
    assert load_config(None, ["method=fedsfd", "model.arch=vq-jscc", "fedsfd.server_epochs=1"]).table("fedsfd").server_epochs == 1
    with pytest.raises(ConfigError, match=r"^fedsfd.distill_epochs"):
        load_config(None, ["method=fedsfd", "model.arch=vq-jscc", "fedsfd.distill_epochs=-1"])


def test_a_run_learns_and_resumes_to_the_same_metrics(base, monkeypatch):
    overrides, tmp = base
    cfg = load_config(None, overrides + ["rounds=3", "train.optimizer=adam", "train.lr=0.01", "train.local_epochs=2"])
    whole, resumed = whole_and_resumed(cfg, tmp, monkeypatch, FedSFD, "user_train", 2,
                                       ("round", "scope", "user", "psnr_db", "server_distill_loss", "uplink_bits"))
    assert whole == resumed
    rows = read_jsonl(tmp / "whole" / "metrics.jsonl")
    glob = {r["round"]: r for r in rows if r["scope"] == "global"}
    assert glob[3]["psnr_db"] > glob[0]["psnr_db"] + 1.0
    users = [r for r in rows if r["scope"] == "user" and r["round"] == 3 and "psnr_db" in r]
    assert len(users) == 3 and glob[3]["users_evaluated"] == 3
    assert glob[3]["psnr_db"] == pytest.approx(sum(r["psnr_db"] for r in users) / 3)


def test_skbs_and_fedsfd_follow_fedsfrs_learning_rate_schedule(base, monkeypatch):
    import semfl.methods.fedsfr.fedsfd as fedsfd_module
    import semfl.methods.fedsfr.skbs as skbs_module
    import semfl.training as training
    from semfl.methods.fedsfr.skbs import SKBS

    overrides, _ = base
    schedule = ["fedsfr.lr_decay=0.5", "fedsfr.lr_decay_every=2", "train.lr=0.02", "fedsfd.server_lr=0.004",
                "fedsfd.distill_lr=0.008"]
    seen = record_learning_rates(monkeypatch, (training, fedsfd_module, skbs_module))
    cfg, run, user_data, transport, method = local_method(FedSFD, overrides + schedule)
    method.run_round(1, [0])  # round 1: the knowledge for round 3's request
    transport.round = 3
    seen.clear()
    method.run_round(3, [0])
    # user: distillation, then local training; base station: its middle
    assert seen == pytest.approx([0.008 * 0.5, 0.02 * 0.5, 0.004 * 0.5])
    cfg, run, user_data, transport, method = local_method(SKBS, [o.replace("method=fedsfd", "method=skbs")
                                                                 for o in overrides + schedule
                                                                 if not o.startswith("fedsfd.")])
    transport.round = 5
    seen.clear()
    transport.send([0], "train", Payload(method.global_weights, codec="dense"))
    assert seen == pytest.approx([0.02 * 0.25, 0.02 * 0.25])  # the personal and the compact model
