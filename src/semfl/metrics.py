"""Image metrics: PSNR, SSIM (torchmetrics) and classifier accuracy.

All image tensors are NCHW with values in ``[0, data_range]`` (``data_range=1`` for semfl's
images in [0, 1]).

PSNR. :func:`psnr` is the **mean of per-image PSNR**: each image's PSNR is computed from that
image's own MSE (``10 log10(data_range^2 / MSE_i)``), then averaged over the batch. This is not
the PSNR of the batch-pooled MSE (which is dominated by the worst images). A pair of identical
images has MSE 0 and PSNR ``+inf``; that is kept (no cap), so the batch mean is ``inf`` too if any
image is reconstructed exactly. Use :func:`psnr_per_image` to inspect or filter.

SSIM convention. semfl reports torchmetrics' ``structural_similarity_index_measure`` with a
Gaussian 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03, mean over the batch of per-image SSIM.
torchmetrics reflect-pads the image by 5 pixels (torch's ``reflect``, which does not repeat the
edge pixel), computes the SSIM map at every pixel of the original image and averages the whole
map (all channels, all H x W positions). scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=...)`` filters with scipy's ``reflect`` mode (which repeats the edge pixel) and then
averages only the map with a 5-pixel border cropped. On the central region (the map cropped by 5
pixels on each side) the two maps are the same numbers: measured max abs difference ~1e-13 in
float64 and ~6e-5 in float32 (cancellation in E[x^2] - mu^2); tests/test_metrics.py asserts
< 1e-10 / < 1e-4. The reported scalars therefore differ only through the border pixels, which
are a large share of a small image (60% of a 28x28 map, 53% of 32x32). Measured on smooth random
images plus Gaussian noise of std sigma, 16-64 images (the sigma = 0.05 column is asserted in
tests/test_metrics.py), torchmetrics minus skimage, batch mean:

    ===========  ===============  ==========  ==========  ==========
    image        sigma 0.02       0.05        0.1         0.2
    ===========  ===============  ==========  ==========  ==========
    1x28x28      -0.003           -0.013      -0.025      -0.026
    3x32x32      -0.002           -0.010      -0.021      -0.025
    ===========  ===============  ==========  ==========  ==========

(SSIM levels ~0.99, 0.93, 0.80, 0.55). Single images differ by up to ~0.1 (28x28, sigma 0.2) in
either direction; on average torchmetrics is lower. So semfl's SSIM is not comparable with
skimage-based numbers in papers beyond the second decimal.
"""
from __future__ import annotations

import torch

# torchmetrics is imported by the functions that use it: it takes seconds (scipy.signal), which
# loading a config or a CLI error should not pay

__all__ = ["psnr", "psnr_per_image", "ssim", "ssim_per_image", "accuracy", "SSIM_KWARGS"]

SSIM_KWARGS = dict(gaussian_kernel=True, sigma=1.5, kernel_size=11, k1=0.01, k2=0.03)


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two NCHW tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR of each image pair from its own MSE, shape (B,); ``inf`` where the images are identical."""
    _check(x, y)
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(y, x, data_range=data_range,
                                   reduction="none", dim=(1, 2, 3))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean of per-image PSNR (dB), a 0-d tensor. ``inf`` if any pair is identical."""
    return psnr_per_image(x, y, data_range).mean()


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each image pair (torchmetrics convention, see module docstring), shape (B,)."""
    _check(x, y)
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(y, x, data_range=data_range,
                                               reduction="none", **SSIM_KWARGS)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean over the batch of per-image SSIM, a 0-d tensor."""
    return ssim_per_image(x, y, data_range).mean()


def accuracy(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``images`` that ``classifier`` (run in eval mode, without grad) labels correctly.

    Batches are moved to the classifier's device; its train/eval mode is restored afterwards.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("accuracy of an empty set")
    param = next(iter(classifier.parameters()), None)
    device = param.device if param is not None else images.device
    was_training = classifier.training
    classifier.eval()
    correct = 0
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                logits = classifier(images[i:i + batch_size].to(device))
                correct += (logits.argmax(dim=-1) == labels[i:i + batch_size].to(device)).sum().item()
    finally:
        classifier.train(was_training)
    return correct / len(images)
