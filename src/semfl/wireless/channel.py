"""Differentiable physical channels between the semantic channel encoder and decoder, built on Sionna.

Conventions (Sionna's):

* The channel input ``x`` is complex, shape ``(B, n)``: one row per image (per user in a stacked
  batch), ``n`` complex channel uses. :func:`power_normalize` scales each row to unit average
  power per complex symbol, so ``Es = 1`` and the SNR is ``Es / N0 = 1 / N0``;
  :func:`snr_to_noise_var` gives ``N0 = 10 ** (-snr_db / 10)``.
* AWGN: ``y = x + n`` with ``n ~ CN(0, N0)`` (variance ``N0 / 2`` per real dimension), drawn by
  :class:`sionna.phy.channel.AWGN`.
* Rayleigh: block fading with one coefficient ``h ~ CN(0, 1)`` per image (constant over the
  image's ``n`` symbols), drawn by :class:`sionna.phy.channel.RayleighBlockFading`;
  ``y = h x + n``. With ``equalize=True`` the receiver knows ``h`` and applies the scalar
  **MMSE** equaliser ``x_hat = conj(h) y / (|h|^2 + N0)``. MMSE rather than zero-forcing
  (``y / h``) because zero-forcing divides by ``|h|``, which is arbitrarily small in a deep fade:
  the noise (and the gradient into the encoder) blows up, whereas the MMSE gain is bounded by
  ``1 / (2 sqrt(N0))``. At high SNR the two coincide; at low SNR MMSE shrinks the estimate
  towards 0 by ``|h|^2 / (|h|^2 + N0)``, which the decoder learns to undo. With
  ``equalize=False`` ``y`` is returned as is and the decoder has to cope with the unknown phase
  and gain itself.

Everything is differentiable w.r.t. ``x``; the channel has no parameters.

Randomness and seeding. Sionna draws from its own per-device ``torch.Generator``
(``sionna.phy.config.torch_rng(device)``), not from torch's global generator. Sionna seeds those
randomly when it is imported, so draws are non-deterministic until :func:`seed_channels` is
called. Setting ``sionna.phy.config.seed`` (what :func:`seed_channels` does) ALSO re-seeds
torch's default CPU generator (and the default CUDA generators, with seed + device index), i.e.
it acts like ``torch.manual_seed``. Caveat: Sionna's CPU generator and torch's default CPU
generator then start from the SAME seed, so e.g. ``torch.randn`` right after
``seed_channels(s)`` repeats the numbers Sionna's first CPU draw will use; seed the model/data
generators separately (or draw them before seeding the channel) if that matters. Importing
``sionna.phy`` itself re-seeds torch's default generators randomly; this module saves and
restores torch's RNG state around that import so that ``torch.manual_seed(s); import
semfl.wireless.channel`` stays reproducible.

vmap. Random draws cannot happen inside ``torch.func.vmap`` (``randomness='error'``), so draw them
outside with :meth:`Channel.sample` and pass the :class:`ChannelDraw` to :meth:`Channel.forward`;
that path is pure elementwise torch and is vmap-safe. :class:`ChannelDraw` is registered as a
pytree, so it can itself be a vmapped argument (a stack of per-user draws, shape ``(U, B, n)``).

Cost. Sionna blocks hold no state besides their device and precision; they are created once per
``(device, precision)`` and shared by every :class:`Channel` (module-level cache), so a forward
call costs a couple of elementwise ops and one random draw. ``import sionna.phy`` takes ~3 s, once, at the first channel use.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@functools.cache
def sionna_phy():
    """``sionna.phy``, imported on first use (it takes seconds, and config loading or a CLI error
    should not pay them) without letting it re-seed torch's default generators at random."""
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    import sionna.phy  # noqa: F401  (sets sionna.phy.config.seed = None -> random re-seed)
    import sionna.phy.channel
    import sionna.phy.utils

    torch.random.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
    return sionna.phy


__all__ = [
    "Channel",
    "ChannelDraw",
    "KINDS",
    "make_channel",
    "power_normalize",
    "seed_channels",
    "snr_to_noise_var",
]

KINDS = ("awgn", "rayleigh")
_PRECISION = {torch.complex64: "single", torch.complex128: "double"}
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def power_normalize(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each row of complex ``z`` (B, ...) to mean ``|z|^2 == 1`` over its non-batch dims.

    Unit average power per complex symbol, Sionna's ``Es = 1`` convention. Differentiable; a row
    of zeros stays zero (the power is clamped at ``eps``, and ``|z|^2`` is computed as
    ``re^2 + im^2`` so there is no ``abs`` gradient singularity at 0).
    """
    if not z.is_complex():
        raise TypeError(f"power_normalize expects a complex tensor, got {z.dtype}")
    dims = tuple(range(1, z.dim()))
    p = (z.real.square() + z.imag.square()).mean(dim=dims, keepdim=True)
    return z * torch.rsqrt(p.clamp_min(eps)).to(z.dtype)


def snr_to_noise_var(snr_db):
    """``N0 = 10 ** (-snr_db / 10)`` (SNR = Es / N0 with Es = 1). Returns the input's type."""
    if isinstance(snr_db, torch.Tensor):
        if not snr_db.is_floating_point():
            snr_db = snr_db.to(torch.get_default_dtype())
        return torch.pow(10.0, -snr_db / 10.0)
    return 10.0 ** (-snr_db / 10.0)


def seed_channels(seed: int) -> None:
    """Make Sionna's generators deterministic: sets ``sionna.phy.config.seed = seed``.

    Side effect (Sionna's): torch's default CPU generator is re-seeded with ``seed`` and each
    default CUDA generator ``i`` with ``seed + i + 1`` (Sionna's device offset), as with
    ``torch.manual_seed``. Sionna's own generator for device ``i`` of its device list
    (``cpu``, ``cuda:0``, ...) gets ``seed + i``.
    """
    sionna_phy().config.seed = int(seed)


@contextmanager
def preserved_rng(device: torch.device | str = "cpu"):
    """Run a block without moving torch's or Sionna's generators: afterwards both are where they
    were, so one-off work (e.g. pretraining a cached model) cannot shift a run's random streams."""
    device = torch.device(device)
    name = _sionna_device(device)
    state = sionna_phy().config.torch_rng(name).get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            sionna_phy().config.torch_rng(name).set_state(state)


@dataclass
class ChannelDraw:
    """Pre-drawn channel randomness for one batch (see :meth:`Channel.sample`)."""

    noise: torch.Tensor  # (B, n) complex, already scaled: CN(0, N0) per entry
    h: torch.Tensor | None  # (B, 1) complex block-fading coefficient, None for AWGN
    noise_var: torch.Tensor  # (B, 1) real, N0 per image


try:  # lets a stack of draws be a torch.func.vmap argument
    from torch.utils._pytree import register_dataclass as _register_dataclass

    _register_dataclass(ChannelDraw, field_names=["noise", "h", "noise_var"], drop_field_names=[])
except Exception:  # pragma: no cover - older/newer torch without this helper
    pass


def _sionna_device(device: torch.device) -> str:
    """Sionna's name for ``device``; devices Sionna does not know (mps, ...) fall back to cpu."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = torch.cuda.current_device() if device.index is None else device.index
        name = f"cuda:{idx}"
    else:
        name = device.type
    return name if name in sionna_phy().config.available_devices else "cpu"


def _precision(dtype: torch.dtype) -> str:
    try:
        return _PRECISION[dtype]
    except KeyError:
        raise TypeError(f"channel symbols must be complex64 or complex128, got {dtype}") from None


@functools.lru_cache(maxsize=None)
def _awgn_block(device: str, precision: str) -> AWGN:
    return sionna_phy().channel.AWGN(precision=precision, device=device)


@functools.lru_cache(maxsize=None)
def _fading_block(device: str, precision: str) -> RayleighBlockFading:
    return sionna_phy().channel.RayleighBlockFading(num_rx=1, num_rx_ant=1, num_tx=1, num_tx_ant=1, precision=precision, device=device)


def _noise_var(snr_db, batch: int, device, real_dtype) -> torch.Tensor:
    """SNR (float, 0-d, (B,) or (B, 1)) -> N0 of shape (B, 1)."""
    snr = torch.as_tensor(snr_db, dtype=real_dtype, device=device)
    if snr.dim() == 0:
        snr = snr.expand(batch)
    elif snr.numel() != batch or (snr.dim() > 1 and snr.shape[-1] != 1) or snr.dim() > 2:
        raise ValueError(f"snr_db must be a scalar or have shape ({batch},), got {tuple(snr.shape)}")
    return snr_to_noise_var(snr.reshape(batch, 1))


class Channel(torch.nn.Module):
    """AWGN or Rayleigh block-fading channel; see the module docstring for the conventions.

    ``forward(x, snr_db, draw=None)``: ``x`` complex (B, n); ``snr_db`` a float or a tensor of
    shape (B,) (one SNR per image / user). Without ``draw`` the randomness is drawn by Sionna on
    ``x``'s device; with ``draw`` (from :meth:`sample`) it is taken from there and ``snr_db`` is
    ignored (``draw.noise_var`` is used), which is the vmap-safe path.
    """

    def __init__(self, kind: str = "awgn", equalize: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown channel kind {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.equalize = bool(equalize)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, equalize={self.equalize}"

    def _equalize(self, y: torch.Tensor, h: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
        if not self.equalize:
            return y
        # Scalar MMSE: conj(h) y / (|h|^2 + N0); bounded gain, -> ZF as N0 -> 0.
        gain = h.conj() / (h.real.square() + h.imag.square() + no)
        return gain * y

    def forward(self, x: torch.Tensor, snr_db: torch.Tensor | float, draw: ChannelDraw | None = None) -> torch.Tensor:
        if draw is not None:
            no = draw.noise_var
            if self.kind == "awgn":
                return x + draw.noise
            if draw.h is None:
                raise ValueError("a Rayleigh channel needs a draw with h (use Channel('rayleigh').sample)")
            return self._equalize(draw.h * x + draw.noise, draw.h, no)

        if x.dim() != 2:
            raise ValueError(f"channel input must be (batch, n) complex symbols, got shape {tuple(x.shape)}")
        precision = _precision(x.dtype)
        dev = _sionna_device(x.device)
        batch = x.shape[0]
        no = _noise_var(snr_db, batch, dev, _REAL[x.dtype])
        awgn = _awgn_block(dev, precision)
        if self.kind == "awgn":
            return awgn(x, no).to(x.device)
        h, _ = _fading_block(dev, precision)(batch_size=batch, num_time_steps=1)
        h = h.reshape(batch, 1)
        y = self._equalize(awgn(h * x.to(dev), no), h, no)
        return y.to(x.device)

    def sample(self, batch: int, n: int, snr_db, device=None, dtype: torch.dtype = torch.complex64) -> ChannelDraw:
        """Pre-draw the randomness of one ``forward`` call on a (batch, n) input.

        Same generators and the same order as ``forward`` (h first, then noise), so with the same
        seed ``forward(x, s, draw=sample(...))`` equals ``forward(x, s)`` exactly.
        """
        precision = _precision(dtype)
        out_device = torch.device("cpu") if device is None else torch.device(device)
        dev = _sionna_device(out_device)
        no = _noise_var(snr_db, batch, dev, _REAL[dtype])
        h = None
        if self.kind == "rayleigh":
            h, _ = _fading_block(dev, precision)(batch_size=batch, num_time_steps=1)
            h = h.reshape(batch, 1).to(out_device)
        block = _awgn_block(dev, precision)  # draw exactly as sionna.phy.channel.AWGN does
        noise = sionna_phy().utils.complex_normal((batch, n), precision=precision, device=dev, generator=block.torch_rng)
        noise = noise * no.sqrt().to(noise.dtype)
        return ChannelDraw(noise=noise.to(out_device), h=h, noise_var=no.to(out_device))


def make_channel(cfg: Any) -> Channel:
    """Build the channel of a :class:`semfl.config.ChannelConfig` (uses ``.kind`` and ``.equalize``)."""
    return Channel(kind=cfg.kind, equalize=cfg.equalize)
