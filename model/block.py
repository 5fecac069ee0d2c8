"""Transformer blocks with joint attention over the whole sequence.

A block holds one or more weight sets (`BlockWeights`). In a `ModalityBlock` there is one per
modality and every token is processed (norms, qkv, QK-norm, gate, output projection, MLP,
modulation) by the weights of its own modality; in a `SharedBlock` there is a single set. In both,
the attention itself runs once over the concatenation of every segment: no cross-attention.

Modulation is adaLN-style: each segment brings its own (shift, scale, gate) x 2, computed once
per distinct timestep outside the blocks (see `TimestepEmbedding`), plus a learned per-block,
per-weight-set offset. It is broadcast over a segment's tokens, never expanded per token.
"""

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from model.args import ModelArgs
from model.init import Linear
from model.layout import Run
from model.rope import apply_rope


@dataclass
class BlockContext:
    """What every block needs besides the hidden states; built once per forward."""

    runs_modality: tuple[Run, ...]
    runs_shared: tuple[Run, ...]
    modulation: torch.Tensor  # (B, n_segments, 6, dim)
    rope_cos: torch.Tensor  # (N, head_dim // 2)
    rope_sin: torch.Tensor
    attn_mask: torch.Tensor | None  # (B, 1, 1, N) bool, True = attend; None = attend everywhere
    # A sparse attention pattern (model/window.py, on a GPU), which then replaces attn_mask:
    # FlexAttention computes only the tiles it keeps. None: SDPA (cuDNN / flash) with attn_mask.
    block_mask: BlockMask | None = None


def modulate(x, shift, scale, lengths):
    """x (B, n, d) holds consecutive segments of `lengths`; shift/scale (B, n_segments, d)."""
    parts = x.split(lengths, dim=1)
    return torch.cat([p * (1 + scale[:, i, None]) + shift[:, i, None] for i, p in enumerate(parts)], dim=1)


def scale_segments(x, gate, lengths):
    parts = x.split(lengths, dim=1)
    return torch.cat([p * gate[:, i, None] for i, p in enumerate(parts)], dim=1)


class HeadGate(nn.Module):
    """Sigmoid gate per attention head. Starts at sigmoid(init_logit) for every head and token,
    where sigmoid has its steepest slope (0.25 at logit 0), so the gate is trainable from step one."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dynamic = args.gate == "dynamic"
        self.init_logit = args.gate_init_logit
        if self.dynamic:
            self.proj = Linear(args.dim, args.n_heads, weight="zeros", bias_value=self.init_logit)
        else:
            self.logit = nn.Parameter(torch.full((args.n_heads,), float(self.init_logit)))

    def reset_parameters(self):
        if self.dynamic:
            self.proj.reset_parameters()
        else:
            nn.init.constant_(self.logit, self.init_logit)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: block input (B, n, dim) -> gate broadcastable to (B, n, heads, 1)."""
        logits = self.proj(h) if self.dynamic else self.logit.expand(*h.shape[:2], -1)
        return torch.sigmoid(logits).unsqueeze(-1)


class BlockWeights(nn.Module):
    """One weight set of a block: everything a token touches except the attention softmax."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hd, kv = args.head_dim, args.n_kv_heads * args.head_dim
        self.attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.qkv = Linear(args.dim, args.dim + 2 * kv, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=args.norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.norm_eps)
        self.gate = HeadGate(args)
        self.out = Linear(args.dim, args.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.w_gate_up = Linear(args.dim, 2 * args.mlp_hidden, bias=False)  # SwiGLU: gate and up fused
        self.w_down = Linear(args.mlp_hidden, args.dim, bias=False)
        # Offset added to the timestep modulation: rows shift1, scale1, gate1, shift2, scale2, gate2.
        # Zero, with a zero timestep projection: residual gates 0, the block is the identity.
        self.modulation = nn.Parameter(torch.zeros(6, args.dim))

    def reset_parameters(self):
        for layer in (self.qkv, self.out, self.w_gate_up, self.w_down, self.attn_norm, self.q_norm, self.k_norm, self.mlp_norm, self.gate):
            layer.reset_parameters()
        nn.init.zeros_(self.modulation)

    def mlp(self, h):
        gate, up = self.w_gate_up(h).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, keys: tuple[str, ...]):
        super().__init__()
        self.args = args
        self.shared = keys == ("shared",)
        self.weights = nn.ModuleDict({k: BlockWeights(args) for k in keys})

    def reset_parameters(self):
        for w in self.weights.values():
            w.reset_parameters()

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        a = self.args
        runs = ctx.runs_shared if self.shared else ctx.runs_modality
        B = x.shape[0]

        # 1. per weight set: norm, modulate, qkv, QK-norm; keep h for the gate
        qs, ks, vs, hs, mods = [], [], [], [], []
        for run in runs:
            w = self.weights[run.key]
            seg = slice(run.first_segment, run.first_segment + len(run.lengths))
            m = ctx.modulation[:, seg] + w.modulation  # (B, s, 6, d)
            h = modulate(w.attn_norm(x[:, run.start : run.end]), m[:, :, 0], m[:, :, 1], run.lengths)
            q, k, v = w.qkv(h).split([a.dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1)
            qs.append(w.q_norm(q.unflatten(-1, (a.n_heads, a.head_dim))))
            ks.append(w.k_norm(k.unflatten(-1, (a.n_kv_heads, a.head_dim))))
            vs.append(v.unflatten(-1, (a.n_kv_heads, a.head_dim)))
            hs.append(h)
            mods.append(m)

        # 2. joint attention over the whole sequence
        q = apply_rope(torch.cat(qs, dim=1), ctx.rope_cos, ctx.rope_sin).transpose(1, 2)
        k = apply_rope(torch.cat(ks, dim=1), ctx.rope_cos, ctx.rope_sin).transpose(1, 2)
        v = torch.cat(vs, dim=1).transpose(1, 2)
        gqa = a.n_kv_heads != a.n_heads
        if ctx.block_mask is not None:
            o = windowed_attention(q, k, v, ctx.block_mask, gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, enable_gqa=gqa)
        o = o.transpose(1, 2)  # (B, N, H, hd)

        # 3. per weight set: head gate, output projection, residual, MLP
        outs = []
        for run, h, m in zip(runs, hs, mods):
            w = self.weights[run.key]
            xr = x[:, run.start : run.end]
            o_run = (o[:, run.start : run.end] * w.gate(h)).reshape(B, -1, a.dim)
            xr = xr + scale_segments(w.out(o_run), m[:, :, 2], run.lengths)
            h2 = modulate(w.mlp_norm(xr), m[:, :, 3], m[:, :, 4], run.lengths)
            outs.append(xr + scale_segments(w.mlp(h2), m[:, :, 5], run.lengths))
        return torch.cat(outs, dim=1)


@functools.cache
def _compiled_flex():
    # Automatic dynamic shapes (dynamic=None): a second sequence length compiles one dynamic
    # kernel for all later ones. Static shapes would recompile per length (trimmed captions give
    # many) and, past dynamo's recompile limit, fall back to the eager path, which computes every
    # score: out of memory at 1080p.
    return torch.compile(flex_attention)


def windowed_attention(q, k, v, block_mask: BlockMask, gqa: bool) -> torch.Tensor:
    """FlexAttention over the tiles block_mask keeps (the model gives it a block mask on a GPU
    only). There it must run as a generated kernel: called eagerly, FlexAttention computes every
    score (at 1080p, 63K^2 of them per head), so outside a compiled block it is compiled here;
    inside one, dynamo inlines it. A direct call on CPU (the tests') runs the exact eager path."""
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():  # a CPU check of the kernel's tiling, not the misuse the warning is for
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def ModalityBlock(args: ModelArgs) -> TransformerBlock:
    """A block whose tokens each use their own modality's weights."""
    return TransformerBlock(args, args.modalities)


def SharedBlock(args: ModelArgs) -> TransformerBlock:
    """A block with one weight set for every modality."""
    return TransformerBlock(args, ("shared",))
