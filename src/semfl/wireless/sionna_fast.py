"""Sionna's 5G LDPC belief-propagation decoder and max-log QAM demapper with fewer memory passes,
bitwise equal.

:class:`sionna.phy.fec.ldpc.LDPC5GDecoder` (flooding, boxplus-phi check nodes, sum variable nodes)
moves each iteration's messages through six gathers, two zero fills and two scatters between its
edge, check-node and variable-node layouts, and its ``phi`` evaluates ``exp(x)`` twice. Here the
index maps are composed once (three gathers per iteration), ``exp(x)`` is evaluated once, and the
node updates work in place in a few buffers instead of allocating ~20 temporaries per iteration.
The arithmetic is the same operations on the same values in the same order, so the decoded bits and
the decoder state are bitwise those of Sionna's decoder (tests/test_digital_baseline.py checks it);
it is several times faster on a CPU. :func:`demap_maxlog` is Sionna's max-log ``Demapper`` with its
constellation points as rows, so its per-bit gathers copy whole rows (faster on a CPU);
a maximum does not depend on the order it is taken in, so its LLRs are bitwise Sionna's too.
"""
from __future__ import annotations

import torch
from sionna.phy.fec.ldpc import LDPC5GDecoder


_PHI_MIN, _PHI_MAX = 8.5e-8, 16.635532  # Sionna's float32 clipping of phi's argument


def _phi_(x: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """Sionna's ``phi(x) = -log(tanh(x / 2))`` for float32 as ``log(e^x + 1) - log(e^x - 1)``, with one
    ``exp``, computed in place: ``x`` is overwritten, the result is written into ``spare``."""
    x.clamp_(min=_PHI_MIN, max=_PHI_MAX).exp_()
    torch.add(x, 1, out=spare).log_()
    return spare.sub_(x.sub_(1).log_())


def cn_update_phi(msg: torch.Tensor, mask: torch.Tensor, llr_clipping: float | None = None) -> torch.Tensor:
    """Sionna's ``cn_update_phi`` (extrinsic boxplus through ``phi``): the same floating-point
    operations on the same values, so bitwise its output, in three buffers instead of ~20.

    The outgoing sign, ``sign(x) * prod(signs)`` with 0 and padding counted as +1, is exactly
    ``-1`` to the power (this edge negative) xor (an odd count of negative edges); multiplying by
    ``+-1`` and by a 0/1 mask is exact in any order."""
    neg = msg < 0
    odd = (neg.sum(dim=2, keepdim=True, dtype=torch.int32) & 1).bool()
    out = torch.logical_xor(neg, odd).to(msg.dtype).mul_(-2).add_(1)
    a = msg.abs()
    b = _phi_(a, torch.empty_like(a)).mul_(mask)  # phi(|x|) per edge, padding 0
    total = b.sum(dim=2, keepdim=True)
    ext = _phi_(torch.sub(total, b, out=a), b)  # phi of the other edges' sum
    out.mul_(ext).mul_(mask)
    return out.clamp_(-llr_clipping, llr_clipping) if llr_clipping is not None else out


def vn_update_sum(msg: torch.Tensor, mask: torch.Tensor, llr_ch: torch.Tensor,
                  llr_clipping: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sionna's ``vn_update_sum`` (extrinsic sum with the channel LLR), in place on ``msg``."""
    x_tot = msg.sum(dim=2).add_(llr_ch)
    x_e = torch.sub(x_tot.unsqueeze(2), msg, out=msg).mul_(mask)
    if llr_clipping is not None:
        x_e.clamp_(-llr_clipping, llr_clipping)
        x_tot.clamp_(-llr_clipping, llr_clipping)
    return x_e, x_tot


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
        if kwargs.get("vn_update", "sum") != "sum" or "cn_update" in kwargs:
            raise ValueError("FastLDPC5GDecoder decodes with boxplus-phi check nodes and sum variable nodes only")
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
        msg_cn = msg_v2c.index_select(1, self._edge_to_cn).view(batch, *cn_shape).mul_(self._cn_mask)
        msg_cn = cn_update_phi(msg_cn, self._cn_mask, self._llr_max)
        msg_vn = msg_cn.reshape(batch, -1).index_select(1, self._cn_to_vn).view(batch, *vn_shape).mul_(self._vn_mask)
        msg_vn_out, x_hat = vn_update_sum(msg_vn, self._vn_mask, llr_ch, self._llr_max)
        return msg_vn_out.reshape(batch, -1).index_select(1, self._vn_to_edge), msg_c2v, x_hat


def demap_maxlog(demapper, y: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
    """``demapper(y, no)`` for a Sionna max-log ``Demapper`` without prior: the same LLRs, computed
    with the constellation points as rows (so the per-bit gathers copy whole rows), one bit at a
    time, in place. ``-(a) / b`` is ``-(a / b)`` exactly, and a maximum is order-free."""
    points = demapper.constellation()
    y1, no1 = y.reshape(-1), torch.broadcast_to(no, y.shape).reshape(-1)
    exponents = (y1.unsqueeze(0) - points.unsqueeze(1)).abs()
    exponents.square_().neg_().div_(torch.clamp_min(no1, demapper._no_threshold))
    c0, c1 = demapper._logits2llrs._c0, demapper._logits2llrs._c1  # [points / 2, bits]: labels with bit 0 / 1
    llr = torch.empty(c0.shape[1], y1.numel(), dtype=exponents.dtype, device=exponents.device)
    for b in range(c0.shape[1]):
        best1, best0 = (exponents.index_select(0, c[:, b]).amax(0) for c in (c1, c0))
        torch.sub(best1, best0, out=llr[b])
    return llr.t().reshape(*y.shape[:-1], -1)
