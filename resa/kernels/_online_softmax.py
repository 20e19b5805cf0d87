"""The flash-attention inner step of the chunk kernel: scores of a key tile and the online-softmax
update (base 2, fp32 running max / sum / accumulator). The sparse decode kernel writes the same
step out inline: through these helpers it measured 11% slower (see its comment)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_scores(q, kt, qk_scale, UPCAST: tl.constexpr):
    """q [M, D] . kt [N, D]^T * qk_scale in fp32 (UPCAST: exact fp32 products, for fp32 inputs and
    the CPU interpreter)."""
    if UPCAST:
        return tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee") * qk_scale
    return tl.dot(q, tl.trans(kt)) * qk_scale


@triton.jit
def online_softmax_step(s, vt, m_i, l_i, acc, UPCAST: tl.constexpr):
    """Fold scores s [M, N] (-inf where masked, base-2 scaled) and values vt [N, D] into the running
    row max m_i, sum l_i and output acc [M, D]; returns the new (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing valid yet keeps m at -inf; shift by 0 then so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc
