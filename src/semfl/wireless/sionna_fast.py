"""Sionna's 5G LDPC belief-propagation decoder and max-log QAM demapper with fewer memory passes,
bitwise equal.

:class:`sionna.phy.fec.ldpc.LDPC5GDecoder` (flooding, boxplus-phi check nodes, sum variable nodes)
moves each iteration's messages through six gathers, two zero fills and two scatters between its
edge, check-node and variable-node layouts, and its ``phi`` evaluates ``exp(x)`` twice. Here the
index maps are composed once (three gathers per iteration) and ``exp(x)`` is evaluated once. The
arithmetic is the same operations on the same values in the same order, so the decoded bits and the
decoder state are bitwise those of Sionna's decoder (tests/test_digital_baseline.py checks it); it
is about twice as fast on a CPU. :func:`demap_maxlog` is Sionna's max-log ``Demapper`` with its
constellation points as rows, so its per-bit gathers copy whole rows (faster on a CPU);
a maximum does not depend on the order it is taken in, so its LLRs are bitwise Sionna's too.
"""
from __future__ import annotations

import torch
from sionna.phy.fec.ldpc import LDPC5GDecoder


def _phi(x: torch.Tensor) -> torch.Tensor:
    """Sionna's ``-log(tanh(x / 2))`` for float32: ``log(e^x + 1) - log(e^x - 1)`` with one ``exp``."""
    e = x.clamp(min=8.5e-8, max=16.635532).exp()
    return torch.log(e + 1) - torch.log(e - 1)


def cn_update_phi(msg: torch.Tensor, mask: torch.Tensor, llr_clipping: float | None = None) -> torch.Tensor:
    """Sionna's ``cn_update_phi`` (extrinsic boxplus through ``phi``), the same operations."""
    sign = torch.sign(msg)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign) * mask + (1.0 - mask)
    sign_out = sign * sign.prod(dim=2, keepdim=True)
    msg_phi = _phi(torch.abs(msg)) * mask
    out = sign_out * _phi(msg_phi.sum(dim=2, keepdim=True) - msg_phi) * mask
    return out.clamp(-llr_clipping, llr_clipping) if llr_clipping is not None else out


def _position_of(valid_edge_idx: torch.Tensor, valid_positions: torch.Tensor, edges: int) -> torch.Tensor:
    """For each edge, its position in a flattened padded (node, degree) layout."""
    pos = torch.full((edges,), -1, dtype=torch.long)
    pos[valid_edge_idx.long()] = valid_positions.long()
    if (pos < 0).any():
        raise RuntimeError("the decoder's padded layout does not cover every edge")
    return pos


class FastLDPC5GDecoder(LDPC5GDecoder):
    """:class:`LDPC5GDecoder` (flooding, boxplus-phi, CPU or GPU) with composed index maps."""

    def __init__(self, encoder, **kwargs):
        super().__init__(encoder, cn_update=cn_update_phi, **kwargs)
        if self._scheduling != "flooding":
            raise ValueError("only flooding is supported")
        e = self._num_edges
        cn_pos = _position_of(self._cn_valid_edge_idx, self._cn_valid_positions, e)  # CN-ordered edge -> slot
        vn_pos = _position_of(self._vn_valid_edge_idx, self._vn_valid_positions, e)  # edge -> VN slot
        perm, perm_inv = self._v2c_perm.long(), self._v2c_perm_inv.long()
        dev = self._v2c_perm.device
        # flat index maps (index_select is several times faster than a 2-D advanced index on a CPU)
        self._edge_to_cn = perm[self._cn_gather_idx.long()].reshape(-1).to(dev)
        self._cn_to_vn = cn_pos[perm_inv.cpu()][self._vn_gather_idx.long().cpu()].reshape(-1).to(dev)
        self._vn_to_edge = vn_pos.to(dev)

    def _bp_iter(self, msg_v2c, msg_c2v, llr_ch, x_hat, it):
        if self._c2v_callbacks or self._v2c_callbacks:
            return super()._bp_iter(msg_v2c, msg_c2v, llr_ch, x_hat, it)
        batch, cn_shape, vn_shape = msg_v2c.shape[0], self._cn_mask.shape, self._vn_mask.shape
        msg_cn = msg_v2c.index_select(1, self._edge_to_cn).view(batch, *cn_shape) * self._cn_mask
        msg_cn = self._cn_update(msg_cn, self._cn_mask, self._llr_max)
        msg_vn = msg_cn.reshape(batch, -1).index_select(1, self._cn_to_vn).view(batch, *vn_shape) * self._vn_mask
        msg_vn_out, x_hat = self._vn_update(msg_vn, self._vn_mask, llr_ch, self._llr_max)
        return msg_vn_out.reshape(batch, -1).index_select(1, self._vn_to_edge), msg_c2v, x_hat


def demap_maxlog(demapper, y: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
    """``demapper(y, no)`` for a Sionna max-log ``Demapper`` without prior: the same LLRs, computed
    with the constellation points as rows so the per-bit gathers copy whole rows."""
    points = demapper.constellation()
    y1, no1 = y.reshape(-1), torch.broadcast_to(no, y.shape).reshape(-1)
    exponents = -(y1.unsqueeze(0) - points.unsqueeze(1)).abs().square() / torch.clamp_min(no1, demapper._no_threshold)
    c0, c1 = demapper._logits2llrs._c0, demapper._logits2llrs._c1  # [points / 2, bits]: labels with bit 0 / 1

    def best(c):
        return exponents.index_select(0, c.reshape(-1)).view(*c.shape, -1).amax(0)  # [bits, symbols]

    return (best(c1) - best(c0)).t().reshape(*y.shape[:-1], -1)
