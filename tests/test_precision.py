"""train.precision = "bf16": autocast training that keeps fp32 weights, channel and payloads."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from semfl.config import ConfigError, TrainConfig, load_config
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner
from semfl.training import autocast, local_train


def test_autocast_context():
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5)
    with autocast("fp32", "cpu"):
        assert conv(x).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert conv(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="train.precision"):
        autocast("fp16", "cpu")


class _SpyChannel(torch.nn.Module):
    """Records the dtype of what the model hands its channel; passes it through."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def forward(self, x, snr_db, draw=None):
        self.seen.append(x.dtype)
        return x


@pytest.mark.parametrize("arch", ["csc", "gsc-m", "jscc"])
def test_channel_gets_complex64_symbols_under_bf16(arch):
    from semfl.models import ImageSpec, build_model

    spy = _SpyChannel()
    torch.manual_seed(0)
    model = build_model(arch, "tiny", ImageSpec(1, 28, 28, 10), spy).eval()
    images, snr = torch.rand(2, 1, 28, 28), torch.full((2,), 10.0)
    with autocast("bf16", "cpu"):
        out = model(images, snr)
    assert spy.seen == [torch.complex64]
    reference = model(images, snr).recon  # fp32
    assert out.recon.shape == reference.shape == (2, 1, 28, 28)
    assert (out.recon.float() - reference).abs().max() < 0.05  # bf16 has ~3 significant digits


def _tiny_model_and_data():
    from semfl.wireless.channel import make_channel
    from semfl.config import ChannelConfig
    from semfl.models import ImageSpec, build_model

    torch.manual_seed(0)
    model = build_model("csc", "tiny", ImageSpec(1, 28, 28, 10), make_channel(ChannelConfig()))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 28, 28, generator=g) * 0.2
    x[:, :, 8:20, 8:20] += 0.7  # structure the decoder can learn quickly
    y = torch.randint(0, 10, (64,), generator=g)
    return model, x, y


def test_bf16_local_training_keeps_fp32_weights_and_tracks_fp32():
    losses = {}
    for precision in ("fp32", "bf16"):
        model, x, y = _tiny_model_and_data()
        cfg = dataclasses.replace(TrainConfig(lr=0.05, batch_size=16), precision=precision)
        clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).requires_grad_(False)
        torch.manual_seed(2)
        losses[precision] = [local_train(model, x, y, cfg, 10.0, clf, torch.Generator().manual_seed(3))
                             for _ in range(6)]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert losses["bf16"][-1] < 0.8 * losses["bf16"][0]  # it learns
    assert losses["bf16"] != losses["fp32"]  # the bf16 kernels did run
    # bf16 rounding changes the numbers, not the trajectory: within 2 % of fp32 at every epoch
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) <= 0.02 * a


def test_config_rejects_bf16_where_it_is_not_implemented(tiny_overrides):
    with pytest.raises(ConfigError, match="train.precision: fedcl trains in fp32"):
        load_config(None, tiny_overrides + ["method=fedcl", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="train.vmap: 'on' needs train.precision"):
        load_config(None, tiny_overrides + ["train.vmap=on", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, tiny_overrides + ["train.precision=fp16"])


@pytest.mark.parametrize("method", ["fedavg", "psfl"])
def test_bf16_runs_are_deterministic_and_learn(tiny_overrides, tmp_path, method):
    """Two runs give the same rows; the global model beats its round-0 self after three rounds of 3
    users with 48 samples each, 32 for PSFL (CPU bf16 kernels are slow: no more data than that needs;
    PSFL's third round regrows pruned weights, which two rounds do not reach; measured PSFL: 7.19 dB at
    round 0, 7.28, 7.36, 7.46 dB after rounds 1-3, loss falling every round)."""
    sets = tiny_overrides + [f"method={method}", "train.precision=bf16", "rounds=3", "eval.snr_sweep=[]",
                             "eval.grid_images=0", "data.max_per_user=48"]
    sets += ["psfl.user_eval_samples=20", "data.max_per_user=32"] if method == "psfl" else []
    rows = []
    for name in ("a", "b"):
        Runner(load_config(None, sets), tmp_path / name, show_progress=False, log=lambda m: None).execute()
        rows.append([{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(tmp_path / name / "metrics.jsonl")])
    assert rows[0] == rows[1]
    globals_ = [r for r in rows[0] if r["scope"] == "global"]
    assert globals_[-1]["loss"] < globals_[0]["loss"]
    assert globals_[-1]["psnr_db"] > globals_[0]["psnr_db"]


def test_pld_in_bf16_tracks_fp32_and_its_kl_stays_fp32(monkeypatch):
    """PSFL's local step honours train.precision; the KL terms are exact enough to stay >= 0."""
    import test_pld  # the PLD tests' tiny mentor (GSC-M, a ViT) / student (CSC) / classifier / images

    from semfl.models import vit
    from semfl.methods.psfl.pld import _kl_to, pld_train

    attention_dtypes = []
    sdpa = vit.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        attention_dtypes.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(vit.F, "scaled_dot_product_attention", spy)
    out = {}
    for precision in ("fp32", "bf16"):
        mentor, student, clf, x, y = test_pld._models()
        cfg = TrainConfig(lr=0.05, local_epochs=2, batch_size=16, precision=precision)
        out[precision] = pld_train(mentor, student, x, y, cfg, 10.0, clf, torch.Generator().manual_seed(0))
    assert set(attention_dtypes) == {torch.float32}  # the CPU attention runs in fp32 under bf16 too
    assert out["bf16"]["student_task"] != out["fp32"]["student_task"]  # bf16 kernels ran
    for name in ("mentor_task", "student_task", "mentor_mse", "student_mse"):
        assert abs(out["bf16"][name] - out["fp32"][name]) <= 0.05 * out["fp32"][name], name
    assert out["bf16"]["mentor_kl"] >= 0 and out["bf16"]["student_kl"] >= 0
    # nearly equal distributions: bf16 (log_)softmax would make this KL mostly rounding noise
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)).bfloat16()
    close = (logits.float() + 0.02 * torch.randn(64, 10, generator=torch.Generator().manual_seed(1))).bfloat16()
    exact = _kl_to(logits.double(), close.double()).item()  # the same bf16 inputs, in float64
    with autocast("bf16", "cpu"):
        got = _kl_to(logits, close).item()
    assert got >= 0 and abs(got - exact) <= 0.05 * exact
