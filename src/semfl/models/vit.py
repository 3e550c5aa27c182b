"""MAE-style ViT building blocks (He et al. 2022), in plain torch.nn.

Parameter names follow the official MAE code (``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
``blocks.{i}.mlp.fc1`` ...) so an official checkpoint's state dict maps onto these modules.

* ``PatchEmbed``: a conv with kernel = stride = patch, tokens in row-major (h, w) order.
* ``get_2d_sincos_pos_embed``: MAE's fixed 2-D sin-cos position embedding. As in MAE, the
  first half of the channels encodes the *column* (w) index and the second half the *row*
  (h) index (MAE builds ``np.meshgrid(grid_w, grid_h)`` and calls the first plane "h").
  Each half is ``[sin(pos * omega), cos(pos * omega)]`` with
  ``omega_k = 1 / 10000 ** (k / (D/4))``, k = 0 .. D/4 - 1.
* ``Block``: pre-norm transformer block (LayerNorm eps 1e-6, fused qkv attention, GELU MLP).
* ``random_masking``: per-sample shuffle by argsort of uniform noise; keeps
  ``round(L * (1 - mask_ratio))`` tokens (MAE uses ``int(...)``; ``round`` avoids float
  truncation such as ``int(48.99999)``; identical for the usual 0.75 on 196 or 49 tokens).
* ``patchify`` / ``unpatchify``: MAE's (B, C, H, W) <-> (B, L, p*p*C) layout, channel-last
  inside a patch (``nchpwq -> nhwpqc``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- positions

def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): [sin(pos * omega), cos(pos * omega)]."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """MAE's 2-D sin-cos table, (gh*gw [+1], embed_dim); the cls row (first) is zeros."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # column index
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # row index
    emb = np.concatenate([emb_a, emb_b], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def sincos_pos_embed_tensor(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """The table as a float32 tensor of shape (1, L [+1], embed_dim)."""
    table = get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=cls_token)
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


# --------------------------------------------------------------------------- modules

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)*(W/p), D) by a conv with kernel = stride = patch."""

    def __init__(self, img_size: tuple[int, int], patch: int, in_chans: int, embed_dim: int):
        super().__init__()
        h, w = img_size
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch {patch}")
        self.img_size = (h, w)
        self.patch = patch
        self.grid_size = (h // patch, w // patch)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected images of size {self.img_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: {num_heads} heads do not divide the width {dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu":
            # bf16 autocast: torch's CPU bf16 attention backward measured ~6x slower than fp32's
            with torch.autocast("cpu", enabled=False):
                qkv = qkv.float()
                out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        else:
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- masking, patches

def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking.

    x: (B, L, D). Returns (x_kept (B, L_keep, D), mask (B, L) with 0 = kept / 1 = removed,
    ids_restore (B, L)) with L_keep = round(L * (1 - mask_ratio)), at least 1. ``noise``
    (B, L) fixes the shuffle (tokens with the smallest noise are kept).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    B, L, D = x.shape
    len_keep = max(1, int(round(L * (1.0 - mask_ratio))))
    if noise is None:
        noise = torch.rand(B, L, generator=generator, device=generator.device if generator is not None else None)
    noise = noise.to(x.device)
    if tuple(noise.shape) != (B, L):
        raise ValueError(f"noise must have shape {(B, L)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), MAE's channel-last order inside a patch."""
    B, C, H, W = imgs.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch {patch}")
    h, w = H // patch, W // patch
    x = imgs.reshape(B, C, h, patch, w, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, patch * patch * C)


def unpatchify(x: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); inverse of ``patchify``."""
    B, L, _ = x.shape
    h, w = grid
    if h * w != L or x.shape[2] != patch * patch * channels:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} to a {h}x{w} grid of {patch}x{patch}x{channels} patches")
    x = x.reshape(B, h, w, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * patch, w * patch)
