"""The single-stream audio-video transformer: segments in, velocities for `generate` segments out.

    latents per segment --patchify + per-modality input projection--> tokens (B, N, dim)
    -> n_modality_in ModalityBlocks -> n_shared SharedBlocks -> n_modality_out ModalityBlocks
    -> per-modality output head on `generate` segments --unpatchify--> velocities

Pure math: no parallelism, precision policy, compile or I/O here (train/ applies those).
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.block import BlockContext, ModalityBlock, SharedBlock
from model.init import Embedding, Linear
from model.layout import SequenceLayout
from model.patch import (
    patchify_audio,
    patchify_image,
    patchify_video,
    unpatchify_audio,
    unpatchify_image,
    unpatchify_video,
)
from model.rope import rope_angles
from model.window import VideoWindow, window_block_mask, window_dense_mask
from model.text import BYTE_VOCAB


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """t -> embedding (dim) -> block modulation (6 x dim), shared by all blocks (each block adds its
    own learned offset). Evaluated once per (sample, segment): never per token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.freq_dim = args.time_freq_dim
        self.mlp = nn.Sequential(Linear(args.time_freq_dim, args.dim, weight=0.02), nn.SiLU(), Linear(args.dim, args.dim, weight=0.02))
        self.to_modulation = Linear(args.dim, 6 * args.dim, weight="zeros")  # adaLN-Zero: every residual gate starts at 0

    def reset_parameters(self):
        for layer in (self.mlp[0], self.mlp[2], self.to_modulation):
            layer.reset_parameters()

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (U,) -> (embedding (U, dim), modulation (U, 6, dim))."""
        emb = self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))
        return emb, self.to_modulation(F.silu(emb)).unflatten(-1, (6, -1))


class OutputHead(nn.Module):
    """Final norm, timestep shift/scale, projection to one token's latent patch. Zero-initialised
    so an untrained model predicts zero velocity."""

    def __init__(self, args: ModelArgs, out_dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps, elementwise_affine=False)
        self.to_modulation = Linear(args.dim, 2 * args.dim, weight="zeros")
        self.proj = Linear(args.dim, out_dim, weight="zeros")

    def reset_parameters(self):
        for layer in (self.to_modulation, self.proj):
            layer.reset_parameters()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x (B, n, dim) of one segment, t_emb (B, dim) of that segment's timestep."""
        shift, scale = self.to_modulation(F.silu(t_emb)).unsqueeze(1).chunk(2, dim=-1)
        return self.proj(self.norm(x) * (1 + scale) + shift)


class AVTransformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        patch_dim = args.patch_dims
        embed = {m: Linear(patch_dim[m], args.dim) for m in patch_dim if m in args.modalities}
        if "text" in args.modalities:
            if args.text_input == "bytes":
                embed["text"] = Embedding(BYTE_VOCAB, args.dim)
            else:
                embed["text"] = Linear(args.text_feature_dim, args.dim)
        self.embed = nn.ModuleDict(embed)
        self.time = TimestepEmbedding(args)
        self.blocks = nn.ModuleList(
            [ModalityBlock(args) for _ in range(args.n_modality_in)]
            + [SharedBlock(args) for _ in range(args.n_shared)]
            + [ModalityBlock(args) for _ in range(args.n_modality_out)]
        )
        # Text is only ever a condition, so it gets no output head.
        self.heads = nn.ModuleDict({m: OutputHead(args, patch_dim[m]) for m in patch_dim if m in args.modalities})
        # Every layer initialised itself in its constructor (model/init.py): no pass over the
        # whole model here, which a model built partitioned (DeepSpeed zero.Init) could not take.
        # Sparse attention between video tokens (model/window.py), e.g. VideoWindow(t=3) for a
        # fast sampler; None: dense. Not a weight and not in ModelArgs: the same weights sample
        # with or without it (its quality cost: docs/performance.md).
        self.video_window: VideoWindow | None = None

    def reset_parameters(self):
        for emb in self.embed.values():
            emb.reset_parameters()
        self.time.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        for head in self.heads.values():
            head.reset_parameters()

    def layout(self, segments) -> SequenceLayout:
        return SequenceLayout(segments, self.args)

    def forward(
        self,
        inputs: list[torch.Tensor],
        layout: SequenceLayout,
        timesteps: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        *,
        stop_after_block: int | None = None,
    ) -> list[torch.Tensor | None] | torch.Tensor:
        """
        inputs: one latent per segment, (B, *segment.shape) (text bytes: (B, L) long).
        timesteps: (B, n_segments) flow time in [0, 1] of each segment; 0 for `condition` segments.
            A segment has one timestep (split a segment to vary it, e.g. per latent frame).
        key_mask: optional (B, N) bool, False on padding tokens nobody should attend to.
        Returns one entry per segment: the velocity (same shape as the input) for `generate`
        segments, None for `condition` segments.
        stop_after_block: return instead the tokens (B, N, dim) after this block (0-based), without
            running the later blocks or the heads: for a reader of intermediate features (the
            distill critic's GAN head), which would otherwise pay for a whole forward.
        """
        n_blocks = len(self.blocks)
        if stop_after_block is not None and not 0 <= stop_after_block < n_blocks:
            raise ValueError(f"stop_after_block={stop_after_block}: the model has blocks 0..{n_blocks - 1}")
        x = self._embed(inputs, layout)
        B, N = x.shape[:2]
        if timesteps.shape != (B, len(layout.segments)):
            raise ValueError(
                f"timesteps: shape {tuple(timesteps.shape)} != (batch, segments) = {(B, len(layout.segments))}; "
                "give one timestep per segment of the layout"
            )
        # Modulation once per (sample, segment), broadcast over the segment's tokens inside the
        # blocks. Not deduplicated with torch.unique: its output size would cost a host sync, for
        # a saving of a few (dim x 6 dim) rows against millions of token rows.
        t_emb, t_mod = self.time(timesteps.reshape(-1))
        cos, sin = rope_tables(layout, x.device)
        attn_mask = None
        if key_mask is not None:
            if key_mask.shape != (B, N):
                raise ValueError(f"key_mask: shape {tuple(key_mask.shape)} != (batch, tokens) = {(B, N)}")
            attn_mask = key_mask.bool()[:, None, None, :]
        block_mask = None
        if self.video_window is not None and any(s.modality == "video" for s in layout.segments):
            # The key mask goes into the window's mask. On a GPU FlexAttention skips the tiles
            # outside the window; on CPU the same pattern is a dense mask for SDPA (model/window.py).
            if x.is_cuda:
                block_mask, attn_mask = window_block_mask(layout, self.video_window, x.device, key_mask), None
            else:
                attn_mask = window_dense_mask(layout, self.video_window, x.device, key_mask)
        ctx = BlockContext(
            runs_modality=layout.runs(shared=False),
            runs_shared=layout.runs(shared=True),
            modulation=t_mod.unflatten(0, (B, -1)),
            rope_cos=cos,
            rope_sin=sin,
            attn_mask=attn_mask,
            block_mask=block_mask,
        )
        for block in self.blocks[: n_blocks if stop_after_block is None else stop_after_block + 1]:
            x = block(x, ctx)
        if stop_after_block is not None:
            return x
        return self._outputs(x, layout, t_emb.unflatten(0, (B, -1)))

    def _embed(self, inputs, layout: SequenceLayout) -> torch.Tensor:
        if len(inputs) != len(layout.segments):
            raise ValueError(f"inputs: got {len(inputs)} tensors for a layout of {len(layout.segments)} segments {layout}")
        batch = inputs[0].shape[0] if inputs else 0
        tokens = []
        for i, (seg, x) in enumerate(zip(layout.segments, inputs)):
            if tuple(x.shape) != (batch, *seg.shape):
                raise ValueError(
                    f"inputs[{i}] ({seg.modality}/{seg.role}): shape {tuple(x.shape)} != (batch, *segment.shape) = {(batch, *seg.shape)}"
                )
            tokens.append(self.embed[seg.modality](self._patchify(seg.modality, x)))
        return torch.cat(tokens, dim=1)

    def _patchify(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        if modality == "video":
            return patchify_video(x, a.video_patch)
        if modality == "image":
            return patchify_image(x, a.video_patch)
        if modality == "audio":
            return patchify_audio(x, a.audio_patch)
        return x  # text: byte ids for the embedding, or features for the projection

    def _outputs(self, x, layout: SequenceLayout, seg_emb: torch.Tensor) -> list[torch.Tensor | None]:
        a = self.args
        outs = []
        for i, (seg, grid) in enumerate(zip(layout.segments, layout.grids)):
            if seg.role != "generate":
                outs.append(None)
                continue
            y = self.heads[seg.modality](x[:, layout.span(i)], seg_emb[:, i])
            if seg.modality == "video":
                outs.append(unpatchify_video(y, grid, a.video_patch))
            elif seg.modality == "image":
                outs.append(unpatchify_image(y, grid, a.video_patch))
            else:
                outs.append(unpatchify_audio(y, a.audio_patch))
        return outs


@functools.lru_cache(maxsize=8)
def rope_tables(layout: SequenceLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin of a layout on a device, built there (no host-to-device copy, so a new
    layout, e.g. text trimmed to another caption length, costs a few small kernels and no sync).
    Cached, for the layouts that recur (a sampler's, over all its steps); with trimmed captions
    training's layouts mostly miss, which costs those kernels only."""
    a = layout.args
    with torch.inference_mode(False):  # a table made while sampling must still serve training
        angles = rope_angles(layout.positions_on(device), a.rope_axes_dim, a.rope_theta)
        return torch.cos(angles), torch.sin(angles)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
