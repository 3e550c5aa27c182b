"""The digital link of the separation baseline: CRC + 5G LDPC + QAM over semfl's channels.

Each image gets ``channel_uses`` complex symbols. With an :class:`~semfl.wireless.link_table.MCS`
(``m`` bits per QAM symbol, code rate ``r``) the image's ``channel_uses * m`` coded bits are split
into equal LDPC codewords of at most :data:`MAX_BLOCK_BITS` coded bits (a multiple of ``m``);
each codeword carries ``floor(n r)`` information bits, of which the last ``crc`` bits are a CRC
(5G's rule: CRC16 for payloads up to 3824 bits, else CRC24A) so the receiver knows which blocks
failed. Every image of a batch has the same layout, so all blocks of the batch go through one
Sionna encoder / mapper / demapper / decoder call.

The channel is the semantic models' own :class:`semfl.wireless.channel.Channel` (same SNR = Es/N0 with
unit-power symbols, Sionna's QAM being unit-power too, same AWGN and per-image Rayleigh block
fading, same generators). On Rayleigh the receiver knows ``h`` (as the semantic models' MMSE
equaliser does) and undoes the channel exactly: the demapper sees ``x + n / h`` with noise
variance ``N0 / |h|^2``, whether or not the semantic channel equalises.

Decoding stops early, as real receivers do: a block stops after the first BP iteration whose hard
decision is a codeword (every parity check satisfied) and passes its CRC; the others run
:data:`FULL_ITERATIONS`, where the CRC alone decides. The decoder is Sionna's, with its index maps
composed and the demapper's gathers done by ``index_select``
(:mod:`semfl.wireless.sionna_fast`, bitwise equal). Blocks of images the caller marks as not needed
(nothing sent) still go through the channel, so the random draws are the same, but are not demapped
or decoded.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from semfl.wireless.channel import Channel, _sionna_device, sionna_phy
from semfl.wireless.link_table import MCS

MAX_BLOCK_BITS = 8000  # coded bits per LDPC codeword (5G's largest info block is 8448 bits)
FULL_ITERATIONS = 20


def crc_degree(payload_bits: int) -> str:
    """5G's transport-block CRC: CRC16 for payloads up to 3824 bits, CRC24A above."""
    return "CRC16" if payload_bits <= 3824 else "CRC24A"


@dataclass(frozen=True)
class BlockLayout:
    """How one image's channel uses are filled at an MCS."""

    mcs: MCS
    blocks: int  # LDPC codewords per image
    coded_bits: int  # n per codeword (multiple of mcs.bits_per_symbol)
    info_bits: int  # k per codeword, CRC included
    crc_bits: int

    @property
    def payload_bits(self) -> int:
        """Source bits one image can carry."""
        return self.blocks * (self.info_bits - self.crc_bits)

    @property
    def symbols(self) -> int:
        """Channel uses actually sent per image (<= the budget)."""
        return self.blocks * self.coded_bits // self.mcs.bits_per_symbol


def layout(channel_uses: int, mcs: MCS) -> BlockLayout | None:
    """The codewords of one image at ``mcs``; None when not even one CRC-protected bit fits."""
    m = mcs.bits_per_symbol
    total = channel_uses * m
    if total <= 0:
        return None
    blocks = -(-total // MAX_BLOCK_BITS)
    n = (total // blocks) // m * m
    k = int(n * mcs.code_rate + 1e-9)
    if k * 5 < n:  # rounding put the rate below 5G's lowest (1/5): send fewer coded bits
        n = 5 * k // m * m
    crc = 16 if crc_degree(k - 16) == "CRC16" else 24
    if k - crc < 8 or n < 24:
        return None
    return BlockLayout(mcs, blocks, n, k, crc)


@functools.lru_cache(maxsize=64)
def _blocks(k: int, n: int, m: int, crc: str, device: str):
    sionna_phy()  # the first Sionna import goes through it: it keeps torch's generator where it was
    from sionna.phy.fec.crc import CRCDecoder, CRCEncoder
    from sionna.phy.fec.ldpc import LDPC5GEncoder
    from sionna.phy.mapping import Demapper, Mapper

    from semfl.wireless.sionna_fast import FastLDPC5GDecoder

    crc_enc = CRCEncoder(crc, device=device)
    enc = LDPC5GEncoder(k, n, num_bits_per_symbol=m, device=device)
    dec = FastLDPC5GDecoder(enc, hard_out=True, num_iter=FULL_ITERATIONS, device=device)
    return (crc_enc, CRCDecoder(crc_enc, device=device), enc, dec,
            Mapper("qam", m, device=device), Demapper("maxlog", "qam", m, device=device))


def transmit(payload: torch.Tensor, plan: BlockLayout, channel: Channel, snr_db: float,
             need: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Send each row of ``payload`` (B, plan.payload_bits) of 0/1 over ``channel`` at ``snr_db``.

    Returns (received bits (B, payload_bits) float 0/1, image ok (B,) bool: all its blocks passed
    their CRC). Randomness comes from the channel's Sionna generators (seed them to repeat). Rows
    where ``need`` (B,) is False are sent but not decoded: zeros and not ok.
    """
    batch = payload.shape[0]
    if payload.shape[1] != plan.payload_bits:
        raise ValueError(f"payload has {payload.shape[1]} bits per image, the layout carries {plan.payload_bits}")
    device = _sionna_device(payload.device)
    m = plan.mcs.bits_per_symbol
    crc = "CRC16" if plan.crc_bits == 16 else "CRC24A"
    from semfl.wireless.sionna_fast import demap_maxlog

    crc_enc, crc_dec, enc, dec, mapper, demapper = _blocks(plan.info_bits, plan.coded_bits, m, crc, device)
    u = payload.to(device=device, dtype=torch.float32).reshape(batch * plan.blocks, -1)
    x = mapper(enc(crc_enc(u))).reshape(batch, plan.symbols)
    draw = channel.sample(batch, plan.symbols, snr_db, device=device, dtype=x.dtype)
    y = channel(x, snr_db, draw=draw)
    no = draw.noise_var.expand(batch, plan.symbols)
    if draw.h is not None:  # coherent receiver: undo h (and the MMSE gain) exactly
        h2 = draw.h.real.square() + draw.h.imag.square()
        gain = draw.h.conj() / (h2 + draw.noise_var) * draw.h if channel.equalize else draw.h
        y = y / gain
        no = no / h2
    rows = torch.arange(batch, device=device) if need is None else need.to(device).nonzero().reshape(-1)
    bits = torch.zeros(batch, plan.blocks, plan.info_bits - plan.crc_bits, device=device)
    ok = torch.zeros(batch, plan.blocks, dtype=torch.bool, device=device)
    if len(rows):
        llr = demap_maxlog(demapper, y[rows], no[rows]).reshape(len(rows) * plan.blocks, plan.coded_bits)
        got, got_ok = dec.decode_until_valid(llr, crc_dec, FULL_ITERATIONS)
        bits[rows] = got.reshape(len(rows), plan.blocks, -1)
        ok[rows] = got_ok.reshape(len(rows), plan.blocks)
    return bits.reshape(batch, -1).to(payload.device), ok.all(1).to(payload.device)
