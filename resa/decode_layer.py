"""The two halves of a decoder layer around attention, as plain functions of tensors.

The decode step calls them once per layer with that layer's weights. Written over tensors (not
modules) so one `torch.compile` serves every layer: compiled, the norms, RoPE, SiLU-gating and
residual adds fuse into a few kernels, which matters when a CUDA graph replays hundreds of small
kernels per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def pre_attention(x, norm_w, eps, wqkv, bqkv, qn_w, kn_w, cos, sin, num_heads: int, num_kv_heads: int,
                  head_dim: int):
    """x [B, T, hidden] -> post-RoPE q [B, H, T, D], k and v [B, HKV, T, D] (Qwen3 q/k norms when
    qn_w/kn_w are given; bqkv may be None)."""
    return project_qkv(rms_norm(x, norm_w, eps), eps, wqkv, bqkv, qn_w, kn_w, cos, sin,
                       num_heads, num_kv_heads, head_dim)


def project_qkv(h, eps, wqkv, bqkv, qn_w, kn_w, cos, sin, num_heads: int, num_kv_heads: int, head_dim: int):
    """Normed hidden states h [B, T, hidden] -> post-RoPE q [B, H, T, D], k and v [B, HKV, T, D].
    wqkv: the q, k and v projections stacked by output row (one matrix product instead of three)."""
    B, T, _ = h.shape
    qkv = F.linear(h, wqkv, bqkv)
    q, k, v = qkv.split((num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1)
    q = q.view(B, T, num_heads, head_dim)
    k = k.view(B, T, num_kv_heads, head_dim)
    v = v.view(B, T, num_kv_heads, head_dim)
    if qn_w is not None:
        q, k = rms_norm(q, qn_w, eps), rms_norm(k, kn_w, eps)
    return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


def post_attention(x, attn_out, wo, norm_w, eps, wgu, wd):
    """Residual add of the attention output [B, T, H*D] projected by wo, then the SwiGLU MLP block
    (wgu: gate and up projections stacked by output row)."""
    x = x + F.linear(attn_out, wo)
    h = rms_norm(x, norm_w, eps)
    gate, up = F.linear(h, wgu).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, wd)
