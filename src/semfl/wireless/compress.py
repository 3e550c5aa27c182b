"""Update compressors of the baselines (algorithms.md §2): pure tensor functions.

* top-k with error feedback (Stich 2018; Karimireddy 2019)
* STC, sparse ternary compression with error accumulation (Sattler et al. 2019)
* FTTQ / T-FedAvg ternarisation with a straight-through estimator (Xu et al. 2020)
* QSGD quantiser of FedPAQ (Alistarh 2017; Reisizadeh et al. 2020)

The matching codecs (exact bit counts, exact round trips) are in semfl.wireless.codecs.{stc,ternary,qsgd};
top-k payloads go through the existing "sparse" codec.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

PHI = (math.sqrt(5.0) + 1.0) / 2.0
SCALAR_BITS = 32  # mu (STC), w_p (FTTQ), the norm / grid unit (QSGD)
QSGD_UNIT_BITS = 15  # significant bits of the QSGD grid unit, so level * unit is exact in float32


def keep_count(fraction: float, numel: int) -> int:
    """k = ceil(fraction * N), clipped to [0, N]; a 1e-9 slack so e.g. 0.07 * 100 gives 7, not 8."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"compress: fraction must lie in [0, 1], got {fraction}")
    return min(numel, max(0, math.ceil(fraction * numel - 1e-9)))


def _topk_index(flat: Tensor, k: int) -> Tensor:
    """Indices of exactly k entries of largest |flat|; among equal magnitudes at the cut the
    lowest indices win, so the choice is deterministic whatever torch.topk does with ties."""
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    a = flat.abs()
    cut = torch.topk(a, k, sorted=False).values.min()
    above = torch.nonzero(a > cut).reshape(-1)
    at_cut = torch.nonzero(a == cut).reshape(-1)[: k - above.numel()]
    return torch.cat([above, at_cut])


def topk_mask(v: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly k entries of largest |v| (ties broken by lowest flat index)."""
    flat = v.reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"compress: k={k} outside [0, {flat.numel()}]")
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=v.device)
    mask[_topk_index(flat, k)] = True
    return mask.reshape(v.shape)


def topk(v: Tensor, k: int) -> Tensor:
    """Keep exactly the k largest |v| entries, zero the rest."""
    return torch.where(topk_mask(v, k), v, torch.zeros_like(v))


def topk_error_feedback(delta: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None,
                        fraction: float, scope: str = "layer") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """v = delta + e; sent = top-k(v) per tensor ("layer") or over all tensors ("global");
    e_new = v - sent, written with torch.where so that sent + e_new == v bitwise."""
    if scope not in ("layer", "global"):
        raise ValueError(f"compress: scope must be 'layer' or 'global', got {scope!r}")
    v = {n: (d + residual[n]) if residual is not None else d.clone() for n, d in delta.items()}
    if scope == "layer":
        masks = {n: topk_mask(t, keep_count(fraction, t.numel())) for n, t in v.items()}
    else:
        names = list(v)
        flat = torch.cat([v[n].reshape(-1) for n in names]) if names else torch.zeros(0)
        mask = topk_mask(flat, keep_count(fraction, flat.numel()))
        masks, start = {}, 0
        for n in names:
            masks[n] = mask[start:start + v[n].numel()].reshape(v[n].shape)
            start += v[n].numel()
    sent = {n: torch.where(masks[n], t, torch.zeros_like(t)) for n, t in v.items()}
    new_residual = {n: torch.where(masks[n], torch.zeros_like(t), t) for n, t in v.items()}
    return sent, new_residual


# --------------------------------------------------------------------------- STC
def stc(t: Tensor, p: float) -> Tensor:
    """Sparse ternary compression: k = ceil(p N) entries of largest |t| become sign(t) * mu,
    mu = mean of those k magnitudes; the rest are 0. Exactly k nonzeros (ties by lowest index).
    If t has fewer than k nonzeros, only its nonzeros are kept (k_eff = nnz), so zeros never
    receive a sign."""
    flat = t.reshape(-1)
    k = min(keep_count(p, flat.numel()), int(torch.count_nonzero(flat)))
    out = torch.zeros_like(flat)
    if k == 0:
        return out.reshape(t.shape)
    index = _topk_index(flat, k)
    picked = flat[index]
    mu = picked.abs().mean()
    out[index] = torch.where(picked > 0, mu, -mu)
    return out.reshape(t.shape)


def stc_error_accumulation(delta: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None,
                           p: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A = residual + delta; sent = STC(A) per tensor; residual = A - sent (equal to A, bitwise,
    where nothing was sent; within float rounding of A - mu elsewhere)."""
    acc = {n: (d + residual[n]) if residual is not None else d.clone() for n, d in delta.items()}
    sent = {n: stc(a, p) for n, a in acc.items()}
    new_residual = {n: torch.where(sent[n] != 0, a - sent[n], a) for n, a in acc.items()}
    return sent, new_residual


def golomb_position_bits(numel: int, k: int) -> float:
    """Expected bits of Golomb-coded positions of k nonzeros among N (Sattler et al. 2019):
    q = k/N, b* = 1 + floor(log2(ln(phi - 1) / ln(1 - q))), mean bits per position
    b* + 1 / (1 - (1 - q)^(2^b*)); total k * that.
    Edge cases: k == 0 -> 0. k >= N (q = 1) -> a bitmap, N bits. For dense q (q >~ 0.38) the
    formula gives b* <= 0; b* is clipped at 0 (unary coding), which costs k / q = N bits, i.e.
    the bitmap again."""
    if k < 0 or k > numel:
        raise ValueError(f"compress: k={k} outside [0, {numel}]")
    if k == 0:
        return 0.0
    if k == numel:
        return float(numel)
    q = k / numel
    b_star = max(0, 1 + math.floor(math.log2(math.log(PHI - 1.0) / math.log1p(-q))))
    return k * (b_star + 1.0 / (1.0 - (1.0 - q) ** (2 ** b_star)))


def stc_bits(numel: int, k: int) -> int:
    """One sign bit per nonzero + Golomb positions, rounded up, + 32 bits for mu."""
    return math.ceil(k + golomb_position_bits(numel, k)) + SCALAR_BITS


# --------------------------------------------------------------------------- FTTQ
def ternary_threshold(theta: Tensor, mode: str = "adaptive") -> Tensor:
    """Delta = 0.05 max|theta| ("fixed") or 0.07 sum|theta| / (d0 d1) ("adaptive", the authors'
    default; d0, d1 the first two dims, d0 d1 = numel for a 1-D tensor)."""
    a = theta.detach().abs()
    if mode == "fixed":
        return 0.05 * a.max()
    if mode == "adaptive":
        d0d1 = theta.shape[0] * theta.shape[1] if theta.dim() >= 2 else max(1, theta.numel())
        return 0.07 * a.sum() / d0d1
    raise ValueError(f"compress: ternary threshold mode must be 'adaptive' or 'fixed', got {mode!r}")


def ternarize(theta: Tensor, wp: float | Tensor = 1.0, delta_mode: str = "adaptive") -> Tensor:
    """theta^t = wp * 1[theta > Delta] - wp * 1[theta < -Delta]: values in {-wp, 0, +wp}."""
    delta = ternary_threshold(theta, delta_mode)
    wp = torch.as_tensor(wp, dtype=theta.dtype, device=theta.device).reshape(())
    zero = torch.zeros((), dtype=theta.dtype, device=theta.device)
    return torch.where(theta > delta, wp, torch.where(theta < -delta, -wp, zero))


class TernaryQuant(torch.autograd.Function):
    """y = ternarize(theta, wp) with straight-through gradients (Xu et al. 2020):
    dL/dtheta = wp * g where |theta| > Delta, else g;  dL/dwp = sum_{|theta| > Delta} sign(theta) g.
    Usage: TernaryQuant.apply(theta, wp, "adaptive") with wp a learnable scalar tensor."""

    @staticmethod
    def forward(ctx, theta: Tensor, wp: Tensor, delta_mode: str = "adaptive") -> Tensor:
        delta = ternary_threshold(theta, delta_mode)
        ctx.save_for_backward(theta, wp, delta)
        return ternarize(theta, wp.detach(), delta_mode)

    @staticmethod
    def backward(ctx, grad: Tensor):
        theta, wp, delta = ctx.saved_tensors
        big = theta.abs() > delta
        w = wp.detach().reshape(()).to(grad.dtype)
        grad_theta = torch.where(big, w * grad, grad)
        grad_wp = (torch.sign(theta) * grad * big).sum().reshape(wp.shape).to(wp.dtype)
        return grad_theta, grad_wp, None


def ternary_layers(named_params: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
                   full_precision: Iterable[str] | None = None) -> list[str]:
    """Names of the tensors FTTQ quantises: weights with dim >= 2 ('...weight'), except those named in
    ``full_precision`` (FTTQ passes the layers that read the input and write the output, found by data
    flow: semfl.methods.compression.fttq.io_layers) or, without it, the first and the last such tensor in
    registration order; biases and norm parameters (1-D) stay full precision."""
    items = named_params.items() if isinstance(named_params, Mapping) else named_params
    names = [n for n, t in items if t.dim() >= 2 and n.split(".")[-1].endswith("weight")]
    if full_precision is None:
        return names[1:-1]
    keep = set(full_precision)
    return [n for n in names if n not in keep]


# --------------------------------------------------------------------------- QSGD
def qsgd_unit(norm: float, s: int) -> float:
    """The grid unit u ~ ||x|| / s, rounded UP to QSGD_UNIT_BITS significant bits. Then
    level * u is exact in float32 for every level <= 511 (so the codec can recover the integer
    levels), s * u >= ||x|| keeps every |x_i| / u <= s (no clipping, the quantiser stays
    unbiased), and s * u exceeds ||x|| by a relative 2^-15 at most."""
    if norm <= 0.0:
        return 0.0
    m, e = math.frexp(norm / s)
    return math.ldexp(math.ceil(math.ldexp(m, QSGD_UNIT_BITS)), e - QSGD_UNIT_BITS)


def qsgd(x: Tensor, s: int, generator: torch.Generator) -> Tensor:
    """QSGD with s levels: Q_s(x)_i = ||x||_2 sign(x_i) xi_i, l = floor(s |x_i| / ||x||),
    xi_i = (l + 1)/s with probability s |x_i| / ||x|| - l, else l/s. Unbiased; Q(0) = 0.
    ||x|| / s is replaced by the grid unit qsgd_unit(||x||, s) (relative change <= 2^-15) so the
    output is exactly sign * level * unit in float32. Uniform draws come from `generator`
    (on its own device), one per entry, so a seeded generator gives identical outputs."""
    if not 1 <= s <= 256:
        raise ValueError(f"compress: QSGD levels s must lie in [1, 256], got {s}")
    x64 = x.detach().to(torch.float64)
    unit = qsgd_unit(float(torch.linalg.vector_norm(x64)), s)
    if unit == 0.0:
        return torch.zeros_like(x)
    r = (x64.abs() / unit).clamp(max=float(s))
    low = torch.floor(r)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=generator.device)
    level = low + (u.to(x.device) < (r - low)).to(torch.float64)
    return (torch.sign(x64) * level * unit).to(x.dtype)


def qsgd_bits(numel: int, s: int) -> int:
    """32 bits for the norm (grid unit) + per entry a sign bit and ceil(log2(s + 1)) level bits."""
    return SCALAR_BITS + numel * (1 + math.ceil(math.log2(s + 1)))


# --------------------------------------------------------------------------- FedSFR's stochastic VQ
def stochastic_grid_quantize(values: Tensor, grid: Tensor, generator: torch.Generator) -> Tensor:
    """FedSFR's stochastic VQ of kept update values onto the M-QAM grid, unbiased.

    The values are scaled by g_max / max|values| into [-g_max, g_max] (g_max: the grid's largest
    coordinate, known to everyone; max|values| is sent), and each lands on one of its two neighbouring
    grid coordinates with linear probabilities. For a 2-D pair that is the paper's pick among the four
    corners of its cell with bilinear probabilities (they factor per coordinate). The output is the
    picked coordinate scaled back: never 0, since square QAM has no zero coordinate."""
    if values.numel() == 0:
        return torch.zeros_like(values)
    scale = values.detach().abs().max()
    if scale == 0:
        return torch.zeros_like(values)
    grid = grid.to(values.device, torch.float64)
    g_max = grid[-1]
    u = (values.detach().to(torch.float64) / scale.to(torch.float64) * g_max).clamp(-g_max, g_max)
    hi_index = torch.searchsorted(grid, u).clamp(1, len(grid) - 1)
    lo, hi = grid[hi_index - 1], grid[hi_index]
    draw = torch.rand(values.shape, generator=generator, dtype=torch.float64, device=generator.device).to(values.device)
    picked = torch.where(draw < (u - lo) / (hi - lo), hi, lo)
    return (picked * scale.to(torch.float64) / g_max).to(values.dtype)


def position_bits(numel: int, nonzeros: int) -> int:
    index_bits = nonzeros * max(1, math.ceil(math.log2(numel))) if numel > 1 else nonzeros
    return min(index_bits, numel)


def svq_bits(numel: int, kept: int, bits_per_symbol: int) -> int:
    """Top-k + stochastic VQ of one tensor: the scale and the count (32 bits each), the positions
    (index list or bitmap, the cheaper) and one codeword index per pair of kept values."""
    return 2 * SCALAR_BITS + position_bits(numel, kept) + math.ceil(kept / 2) * bits_per_symbol


def svq_fraction_for_budget(numels: Iterable[int], budget_bits: float, bits_per_symbol: int) -> float:
    """The largest per-layer keep fraction whose payload fits ``budget_bits`` (0 when not even the
    per-tensor scalars fit; the search runs on the exact bit count)."""
    numels = list(numels)
    total = lambda p: sum(svq_bits(n, keep_count(p, n), bits_per_symbol) for n in numels)  # noqa: E731
    if total(1.0) <= budget_bits:
        return 1.0
    if total(0.0) > budget_bits:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= budget_bits else (lo, mid)
    return lo


def svq_error_feedback(delta: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None, fraction: float,
                       grid: Tensor, generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """v = delta + e; per tensor keep the top-k of |v|, quantise the kept values stochastically;
    e_new = v - sent (the memory holds the sparsification and the quantisation error)."""
    sent, new_residual = {}, {}
    for name, d in delta.items():
        v = d + residual[name] if residual is not None else d.clone()
        mask = topk_mask(v, keep_count(fraction, v.numel()))
        q = torch.zeros_like(v)
        q[mask] = stochastic_grid_quantize(v[mask], grid, generator)
        sent[name], new_residual[name] = q, v - q
    return sent, new_residual
