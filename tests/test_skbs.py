"""SKBS (FedSFR's KD baseline): mutual distillation against autograd, only the compact model on the
link and within each budget, personal models that stay with their users, resume, a whole run."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.nn import functional as F

from conftest import local_method, vq_overrides, whole_and_resumed
from semfl.wireless.channel import make_channel
from semfl.wireless.codecs import Payload
from semfl.config import ConfigError, load_config
from semfl.methods.fedsfr.skbs import SKBS, mutual_distillation
from semfl.protocol import seeding
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner
from semfl.training import batches, reconstruction_loss, snr_tensor


@pytest.fixture
def base(fmnist_root, tmp_path, shared_cache):
    extra = ["eval.grid_images=0", "skbs.user_eval_samples=50"]
    return vq_overrides(fmnist_root, shared_cache, "skbs", users=3) + extra, tmp_path


def test_mutual_distillation_is_each_models_own_loss_against_autograd(base):
    overrides, _ = base
    cfg, run, user_data, transport, method = local_method(SKBS, overrides)
    personal, compact = method.personal, method.model
    x, y = user_data[0][0][:16], user_data[0][1][:16]
    train = dataclasses.replace(cfg.train, optimizer="sgd", lr=0.1, momentum=0.0, local_epochs=1, batch_size=16,
                                grad_clip=0.0)
    ref_p, ref_c = copy.deepcopy(personal), copy.deepcopy(compact)
    # the expected step: each model's own total, differentiated alone, on the same batch and noise
    seeding.enter(7, "mutual")
    idx = next(iter(batches(16, 16, torch.Generator().manual_seed(3))))
    snr = snr_tensor(20.0, 16, x.device)
    ref_p.train(), ref_c.train()
    out_p, out_c = ref_p(x[idx], snr), ref_c(x[idx], snr)
    expected = {}
    for name, model, out, other in (("p", ref_p, out_p, out_c), ("c", ref_c, out_c, out_p)):
        task, _ = reconstruction_loss(out.recon, x[idx], y[idx], run.classifier, 0.0)
        total = task + 0.5 * F.mse_loss(out.recon, other.recon.detach()) + out.aux
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(total, list(params.values()), retain_graph=True, allow_unused=True)
        expected[name] = {k: p - 0.1 * (g if g is not None else 0) for (k, p), g in zip(params.items(), grads)}
    seeding.enter(7, "mutual")
    stats = mutual_distillation(personal, compact, x, y, train, 20.0, run.classifier, torch.Generator().manual_seed(3), 0.5)
    for name, model in (("p", personal), ("c", compact)):
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name][k].detach(), rtol=1e-4, atol=1e-6, msg=f"{name}:{k}")
    assert stats["personal_distill"] > 0 and stats["compact_distill"] > 0


def test_only_the_compact_model_crosses_the_link_within_budget(base):
    overrides, _ = base
    cfg, run, user_data, transport, method = local_method(SKBS, overrides + ["fedsfr.slot_s=0.01"])
    compact_shapes = {k: v.shape for k, v in method.global_weights.items()}
    personal_count = sum(p.numel() for p in method.personal.parameters())
    assert sum(v.numel() for v in method.global_weights.values()) < personal_count / 2.5
    replies = transport.send(range(3), "train", Payload(method.global_weights, codec="dense"))
    links = {r["user"]: r for r in run.link.drain(1)}
    for user, reply in replies.items():
        assert {k: v.shape for k, v in reply.tensors.items()} == compact_shapes
        assert links[user]["uplink_bits"] <= reply.meta["budget_bits"]
        assert 0 < reply.meta["keep_fraction"] <= 1
        state = transport.states[user]
        assert set(state) == {"personal", "residual"}  # the personal model stays with its user
        assert {k: v.shape for k, v in state["personal"].items()} != compact_shapes
    first = transport.states[0]["personal"]
    assert any(not torch.equal(first[k], transport.states[1]["personal"][k]) for k in first)  # personal per user
    # a second round starts from the user's own trained personal model, not from the shared init
    transport.round = 2
    before = {k: v.clone() for k, v in first.items()}
    transport.send([0], "train", Payload(method.global_weights, codec="dense"))
    assert any(not torch.equal(before[k], method.personal_init[k]) for k in before)
    assert any(not torch.equal(before[k], transport.states[0]["personal"][k]) for k in before)


def test_config_errors_name_the_field(base):
    with pytest.raises(ConfigError, match=r"^model.arch: skbs"):
        load_config(None, ["method=skbs"])
    with pytest.raises(ConfigError, match=r"^skbs.compact_width"):
        load_config(None, ["method=skbs", "model.arch=vq-jscc", "skbs.compact_width=0"])
    # each error names the offending field alone
    with pytest.raises(ConfigError, match=r"^skbs.distill_weight: must be >= 0, got -1") as err:
        load_config(None, ["method=skbs", "model.arch=vq-jscc", "skbs.distill_weight=-1"])
    assert "user_eval_samples" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^skbs.user_eval_samples: must be >= 0") as err:
        load_config(None, ["method=skbs", "model.arch=vq-jscc", "skbs.user_eval_samples=-1"])
    assert "distill_weight" not in str(err.value)
    cfg = load_config(None, ["method=skbs", "model.arch=vq-jscc", "skbs.distill_weight=0", "skbs.user_eval_samples=0"])
    assert cfg.table("skbs").distill_weight == 0 and cfg.table("skbs").user_eval_samples == 0  # both bounds allowed


def test_a_run_learns_and_resumes_to_the_same_metrics(base, monkeypatch):
    overrides, tmp = base
    cfg = load_config(None, overrides + ["rounds=3", "train.optimizer=adam", "train.lr=0.01", "train.local_epochs=2",
                                         "fedsfr.slot_s=0.2"])
    whole, resumed = whole_and_resumed(cfg, tmp, monkeypatch, SKBS, "user_train", 2,
                                       ("round", "scope", "user", "psnr_db", "personal_psnr_db", "uplink_bits"))
    assert whole == resumed
    rows = read_jsonl(tmp / "whole" / "metrics.jsonl")
    glob = {r["round"]: r for r in rows if r["scope"] == "global"}
    assert glob[3]["psnr_db"] > glob[0]["psnr_db"] + 1.0
    assert glob[3]["personal_psnr_db"] > glob[1]["personal_psnr_db"]
    users = [r for r in rows if r["scope"] == "user" and r["round"] == 3]
    assert len(users) == 3 and all("personal_psnr_db" in r and r["role"] == "update" for r in users)
