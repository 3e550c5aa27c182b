"""GSC mentors: MAE blocks, the GSC forward, MAE pretraining, official-checkpoint loading."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semfl.wireless.channel import Channel
from semfl.models import ImageSpec, available_archs, build_model
from semfl.models.gsc import GSC_PRESETS, count_parameters, load_mae_checkpoint, mae_loss, pretrain_mae
from semfl.models.vit import get_2d_sincos_pos_embed, patchify, random_masking, unpatchify

ARCHS = ("gsc-m", "gsc-l", "gsc-h")
MNIST = ImageSpec(1, 28, 28, 10)
CIFAR = ImageSpec(3, 32, 32, 10)


@pytest.fixture(scope="module")
def channel():
    return Channel("awgn", False)


def _model(arch, spec, channel, scale="tiny", seed=0):
    torch.manual_seed(seed)
    return build_model(arch, scale, spec, channel)


def test_registered():
    assert set(ARCHS) <= set(available_archs())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [MNIST, CIFAR], ids=["1x28x28", "3x32x32"])
def test_shapes_power_and_gradients(arch, spec, channel):
    model = _model(arch, spec, channel)
    B, tokens, D = 4, (spec.height // 4) * (spec.width // 4), 16
    assert model.tokens == tokens and model.semantic_dim == D
    images = torch.rand(B, spec.channels, spec.height, spec.width)
    out = model(images, 10.0)
    assert out.S.shape == (B, tokens, D)
    assert out.C.shape == out.S.shape
    assert out.X.is_complex() and out.X.shape == (B, tokens * 2)  # tiny: 2 symbols per token
    assert out.recon.shape == images.shape
    assert 0.0 <= out.recon.min() and out.recon.max() <= 1.0
    power = out.X.abs().pow(2).mean(dim=1)
    torch.testing.assert_close(power, torch.ones(B), rtol=1e-4, atol=1e-4)
    # per-image SNR tensor works too
    assert model(images, torch.tensor([0.0, 5.0, 10.0, 25.0])).recon.shape == images.shape

    loss = (out.recon - images).pow(2).mean() + out.S.pow(2).mean()
    loss.backward()
    for name in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "decoder_embed.weight",
                 "codec.encoder.0.weight", "decoder_blocks.0.mlp.fc1.weight", "decoder_pred.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_sincos_pos_embed_formula(channel):
    D, gh, gw = 8, 2, 3
    table = get_2d_sincos_pos_embed(D, (gh, gw), cls_token=True)
    assert table.shape == (1 + gh * gw, D)
    assert np.all(table[0] == 0)  # cls row
    omega = [1.0, 1.0 / 10000 ** 0.5]  # 1 / 10000 ** (k / (D / 4)), k = 0, 1
    for row, col in [(1, 2), (0, 1), (1, 0)]:
        idx = 1 + row * gw + col  # +1 for the cls row; tokens in row-major order
        # MAE: first half encodes the column (w) index, second half the row (h) index
        expect = [math.sin(col * omega[0]), math.sin(col * omega[1]), math.cos(col * omega[0]), math.cos(col * omega[1]),
                  math.sin(row * omega[0]), math.sin(row * omega[1]), math.cos(row * omega[0]), math.cos(row * omega[1])]
        np.testing.assert_allclose(table[idx], expect, rtol=0, atol=1e-12)
    # the model's tables are the fixed sin-cos buffers, not trained, not in the state dict
    model = _model("gsc-m", MNIST, channel)
    torch.testing.assert_close(model.pos_embed[0], torch.tensor(get_2d_sincos_pos_embed(32, 7, True), dtype=torch.float32))
    torch.testing.assert_close(model.decoder_pos_embed[0],
                               torch.tensor(get_2d_sincos_pos_embed(16, 7, True), dtype=torch.float32))
    names = {n for n, _ in model.named_parameters()} | set(model.state_dict())
    assert "pos_embed" not in names and "decoder_pos_embed" not in names


def test_random_masking_and_patchify():
    B, L, D = 3, 49, 5
    x = torch.arange(B * L, dtype=torch.float32).reshape(B, L, 1).expand(B, L, D).contiguous()
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(0))
    kept, mask, ids_restore = random_masking(x, 0.75, noise=noise)
    n_keep = round(L * 0.25)
    assert kept.shape == (B, n_keep, D)
    assert torch.all(mask.sum(1) == L - n_keep)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.argsort(ids_restore, dim=1), ids_shuffle)
    for b in range(B):
        kept_pos = set((kept[b, :, 0] - b * L).long().tolist())
        assert kept_pos == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    # unshuffling [kept, removed] with ids_restore gives the original sequence back
    removed = torch.gather(x, 1, ids_shuffle[:, n_keep:].unsqueeze(-1).expand(-1, -1, D))
    restored = torch.gather(torch.cat([kept, removed], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    assert torch.equal(restored, x)
    for ratio in (0.0, 0.5, 0.9):
        assert random_masking(x, ratio)[0].shape[1] == round(L * (1 - ratio))

    imgs = torch.rand(2, 3, 8, 12)
    p = patchify(imgs, 4)
    assert p.shape == (2, 6, 48)
    torch.testing.assert_close(p[0, 4].reshape(4, 4, 3), imgs[0, :, 4:8, 4:8].permute(1, 2, 0))  # row 1, col 1
    assert torch.equal(unpatchify(p, 4, 3, (2, 3)), imgs)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_depends_only_on_masked_patches(norm_pix, channel):
    model = _model("gsc-m", MNIST, channel)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 28, 28, generator=g)
    noise = torch.rand(2, 49, generator=g)
    _, mask, _ = random_masking(torch.zeros(2, 49, 1), 0.75, noise=noise)
    masked = mask.bool()  # (B, L) True = removed from the encoder, counted by the loss

    # gradient w.r.t. the target pixels is zero on visible patches, non-zero on masked ones
    target = images.clone().requires_grad_(True)
    loss = mae_loss(model, images, 0.75, norm_pix_loss=norm_pix, noise=noise, target=target)
    loss.backward()
    per_patch = patchify(target.grad, 4).abs().sum(-1)
    assert torch.all(per_patch[~masked] == 0)
    assert torch.all(per_patch[masked] > 0)

    # changing the targets of visible patches leaves the loss unchanged; of a masked one, not
    with torch.no_grad():
        base = mae_loss(model, images, 0.75, norm_pix_loss=norm_pix, noise=noise)
        tp = patchify(images, 4)
        visible = tp.clone()
        visible[~masked] = torch.rand_like(visible[~masked])
        v_loss = mae_loss(model, images, 0.75, norm_pix_loss=norm_pix, noise=noise,
                          target=unpatchify(visible, 4, 1, (7, 7)))
        assert v_loss == base
        hidden = tp.clone()
        b, l = torch.nonzero(masked)[0].tolist()
        hidden[b, l] = torch.rand(hidden.shape[-1]) + 0.5
        h_loss = mae_loss(model, images, 0.75, norm_pix_loss=norm_pix, noise=noise,
                          target=unpatchify(hidden, 4, 1, (7, 7)))
        assert h_loss != base
        # MAE's original decoder input (with the cls token) is available too
        assert torch.isfinite(mae_loss(model, images, 0.75, noise=noise, decoder_cls=True))


def _toy_images(n=64, seed=0):
    """Smooth blobs: easy to reconstruct from a quarter of the patches."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centres = torch.rand(n, 2, generator=g) * 16 + 6
    d2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    return torch.exp(-d2 / 40.0).unsqueeze(1)


def test_pretrain_mae_reduces_loss(channel):
    images = _toy_images()
    model = _model("gsc-m", MNIST, channel)
    codec_before = {k: v.clone() for k, v in model.codec.state_dict().items()}
    seen = []
    hist = pretrain_mae(model, images, epochs=6, batch_size=16, lr=3e-3, seed=0,
                        progress=lambda epoch, loss: seen.append((epoch, loss)))
    assert len(hist) == 6 and [e for e, _ in seen] == list(range(6))
    assert hist[-1] < 0.7 * hist[0], hist
    assert model.training  # mode restored
    for k, v in model.codec.state_dict().items():  # the codec is not part of MAE pretraining
        assert torch.equal(v, codec_before[k])
    # seeded: the same seed gives the same history
    again = pretrain_mae(_model("gsc-m", MNIST, channel), images, epochs=2, batch_size=16, lr=3e-3, seed=0)
    assert again == hist[:2]


def test_parameter_counts(channel):
    paper = {"gsc-m": 112e6, "gsc-l": 330e6, "gsc-h": 658e6}
    counts = {}
    for scale in ("paper", "cpu", "tiny"):
        for arch in ARCHS:
            with torch.device("meta"):
                model = build_model(arch, scale, CIFAR, channel)
            counts[scale, arch] = count_parameters(model)
            assert model.semantic_dim == {"paper": 512, "cpu": 64, "tiny": 16}[scale]
    print("\nGSC parameter counts (3x32x32, incl. channel codec):",
          {f"{s}/{a}": n for (s, a), n in counts.items()})
    for arch, target in paper.items():
        assert abs(counts["paper", arch] - target) / target < 0.05, (arch, counts["paper", arch])
    for scale in ("paper", "cpu", "tiny"):
        assert counts[scale, "gsc-m"] < counts[scale, "gsc-l"] < counts[scale, "gsc-h"]
    assert set(GSC_PRESETS) == {"paper", "cpu", "tiny"}


def _official_state_dict(model):
    """The model's MAE part in the official layout (no codec, plus the sin-cos tables)."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("codec.", "channel."))}
    sd["pos_embed"] = torch.randn(1, 50, 32)  # different from ours: must be ignored
    sd["decoder_pos_embed"] = torch.randn(1, 50, 16)
    return sd


def test_load_mae_checkpoint(tmp_path, channel):
    src = _model("gsc-m", MNIST, channel, seed=0)
    sd = _official_state_dict(src)
    mae_keys = [k for k in sd if k not in ("pos_embed", "decoder_pos_embed")]
    sd["head.weight"] = torch.randn(3, 3)  # unexpected
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd, "epoch": 799}, path)

    dst = _model("gsc-m", MNIST, channel, seed=1)
    codec_before = {k: v.clone() for k, v in dst.codec.state_dict().items()}
    pos_before = dst.pos_embed.clone()
    assert not torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    report = load_mae_checkpoint(dst, path)
    assert sorted(report["loaded"]) == sorted(mae_keys)
    assert report["missing"] == []
    assert report["unexpected"] == ["head.weight"]
    assert sorted(report["ignored"]) == ["decoder_pos_embed", "pos_embed"]
    dst_sd = dst.state_dict()
    for k in mae_keys:
        assert torch.equal(dst_sd[k], sd[k]), k
    assert torch.equal(dst.pos_embed, pos_before)
    for k, v in dst.codec.state_dict().items():
        assert torch.equal(v, codec_before[k])
    images = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(dst.semantic_features(images), src.semantic_features(images))

    # a bare state dict lacking a key: reported missing, the rest loaded
    bare = {k: v for k, v in _official_state_dict(src).items() if k != "decoder_pred.bias"}
    torch.save(bare, tmp_path / "bare.pth")
    report = load_mae_checkpoint(_model("gsc-m", MNIST, channel, seed=2), tmp_path / "bare.pth")
    assert report["missing"] == ["decoder_pred.bias"] and report["unexpected"] == []


def test_load_mae_checkpoint_errors(tmp_path, channel):
    rgb = _model("gsc-m", CIFAR, channel)
    path = tmp_path / "rgb.pth"
    torch.save({"model": _official_state_dict(rgb)}, path)
    gray = _model("gsc-m", MNIST, channel)
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight.*\(32, 3, 4, 4\).*\(32, 1, 4, 4\)"):
        load_mae_checkpoint(gray, path)
    report = load_mae_checkpoint(gray, path, strict_shapes=False)
    assert any(m.startswith("patch_embed.proj.weight") for m in report["mismatched"])
    assert any(m.startswith("decoder_pred.weight") for m in report["mismatched"])
    assert "blocks.0.attn.qkv.weight" in report["loaded"]

    garbage = tmp_path / "not_a_checkpoint.pth"
    garbage.write_bytes(b"this is not a torch file\x00\x01")
    with pytest.raises(ValueError, match="not_a_checkpoint.pth"):
        load_mae_checkpoint(gray, garbage)
    wrong = tmp_path / "a_list.pth"
    torch.save([1, 2, 3], wrong)
    with pytest.raises(ValueError, match="a_list.pth"):
        load_mae_checkpoint(gray, wrong)
