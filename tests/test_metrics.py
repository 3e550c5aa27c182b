"""semfl.metrics: PSNR/SSIM values against hand computation and scikit-image; accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity as sk_ssim
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from semfl.metrics import SSIM_KWARGS, accuracy, psnr, psnr_per_image, ssim, ssim_per_image


def _natural(B, C, H, W, noise, seed=0, dtype=torch.float64):
    """Smooth random images (bicubic upsampling of a 4x coarser grid) and a noisy copy, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(B, C, H // 4, W // 4, generator=g, dtype=torch.float64)
    x = F.interpolate(base, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)
    y = (x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x.to(dtype), y.to(dtype)


def _sk(x, y):
    return np.array([
        sk_ssim(x[i].double().numpy(), y[i].double().numpy(), gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=1.0, channel_axis=0)
        for i in range(len(x))
    ])


def test_psnr_constant_offset_is_exact():
    x = torch.rand(4, 3, 8, 8) * 0.9  # x + 0.1 stays in [0, 1]: no clipping
    y = x + 0.1
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    assert psnr(x * 255, y * 255, data_range=255.0).item() == pytest.approx(20.0, abs=1e-3)
    assert psnr(x, y).dim() == 0


def test_psnr_is_mean_of_per_image_psnr():
    x = torch.rand(3, 1, 8, 8) * 0.5
    d = torch.tensor([0.1, 0.01, 0.2]).view(3, 1, 1, 1)
    y = x + d
    per = psnr_per_image(x, y)
    expected = -20 * torch.log10(d.flatten())  # 10 log10(1 / d^2)
    torch.testing.assert_close(per, expected, rtol=1e-4, atol=1e-4)
    assert psnr(x, y).item() == pytest.approx(expected.mean().item(), abs=1e-3)
    pooled = 10 * math.log10(1 / (d.flatten() ** 2).mean().item())
    assert abs(psnr(x, y).item() - pooled) > 5  # not the PSNR of the pooled MSE


def test_psnr_identical_images_is_inf():
    x = torch.rand(2, 1, 8, 8)
    assert torch.isinf(psnr_per_image(x, x)).all()
    assert math.isinf(psnr(x, x).item()) and psnr(x, x).item() > 0
    y = x.clone()
    y[0] += 0.01
    per = psnr_per_image(x, y.clamp(0, 1))
    assert torch.isfinite(per[0]) and torch.isinf(per[1])


def test_ssim_identical_is_one():
    x, _ = _natural(4, 3, 32, 32, 0.0, dtype=torch.float32)
    s = ssim(x, x)
    assert s.dim() == 0 and s.item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(ssim_per_image(x, x), torch.ones(4), rtol=0, atol=1e-6)


def test_ssim_decreases_with_distortion():
    x, y1 = _natural(4, 1, 28, 28, 0.05, seed=1, dtype=torch.float32)
    _, y2 = _natural(4, 1, 28, 28, 0.2, seed=1, dtype=torch.float32)
    assert 1.0 > ssim(x, y1).item() > ssim(x, y2).item() > 0.0


# Measured (seed 0, B=16, noise sigma 0.05, SSIM ~0.93): batch-mean |torchmetrics - skimage|
# 0.0102 (1x28x28) and 0.0108 (3x32x32); largest per-image gap 0.0258 and 0.0177.
@pytest.mark.parametrize("shape,tol_mean,tol_image", [((1, 28, 28), 0.012, 0.03), ((3, 32, 32), 0.012, 0.02)])
def test_ssim_close_to_skimage_whole_image(shape, tol_mean, tol_image):
    x, y = _natural(16, *shape, 0.05, seed=0, dtype=torch.float32)
    ours = ssim_per_image(x, y).double().numpy()
    ref = _sk(x, y)
    assert abs(ours.mean() - ref.mean()) < tol_mean
    assert np.abs(ours - ref).max() < tol_image
    assert ssim(x, y).item() == pytest.approx(ours.mean(), abs=1e-6)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_ssim_map_equals_skimage_on_central_crop(shape):
    """Away from the 5-pixel border both libraries compute the same SSIM map."""
    x, y = _natural(4, *shape, 0.1, seed=2, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        _, full = tm_ssim(y.to(dtype), x.to(dtype), data_range=1.0, reduction="none", return_full_image=True,
                          **SSIM_KWARGS)
        # semfl's per-image SSIM is that map's mean: the window pinned here is the one it uses
        torch.testing.assert_close(ssim_per_image(x.to(dtype), y.to(dtype)), full.mean(dim=(1, 2, 3)),
                                   rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
        for i in range(len(x)):
            mean, m = sk_ssim(x[i].numpy(), y[i].numpy(), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0, channel_axis=0, full=True)
            crop_sk = m[:, 5:-5, 5:-5]
            crop_tm = full[i].double().numpy()[:, 5:-5, 5:-5]
            assert np.abs(crop_sk - crop_tm).max() < tol
            assert crop_sk.mean() == pytest.approx(mean, abs=1e-12)  # skimage's score = cropped-map mean
            assert crop_tm.mean() == pytest.approx(mean, abs=tol)


class _Fixed(torch.nn.Module):
    """Predicts argmax of the two input features; Dropout would scramble it in train mode."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(p=0.999)
        self.lin = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(2))

    def forward(self, x):
        return self.lin(self.drop(x.flatten(1)))


def test_accuracy_with_known_predictions():
    clf = _Fixed().train()
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0], [5.0, 4.0],
                           [0.0, 9.0], [1.0, 0.5], [0.2, 0.1], [0.3, 0.9], [4.0, 4.5]]).view(10, 1, 1, 2)
    predicted = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 1, 1])
    labels = predicted.clone()
    labels[[1, 4, 7]] = 1 - labels[[1, 4, 7]]  # 3 of 10 wrong
    assert accuracy(clf, images, labels, batch_size=3) == pytest.approx(0.7)
    assert accuracy(clf, images, predicted, batch_size=500) == 1.0
    assert clf.training  # mode restored
    with pytest.raises(ValueError):
        accuracy(clf, images, labels[:5])
