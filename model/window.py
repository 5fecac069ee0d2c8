"""Windowed (sparse) attention between video tokens, for fast sampling of long clips.

At 5 s of 1080p, attention is three quarters of a layer's FLOPs (63K tokens, 31 latent frames).
A `VideoWindow` lets a video token attend only to the video tokens within a few latent frames
(and, optionally, rows and columns) of its own position, and to every text, audio and image
token; text, audio and image tokens still attend to everything. On a GPU it runs through
PyTorch's FlexAttention: the window becomes a block mask (128 x 128 tiles of the score matrix),
and tiles outside every window are never computed. Tokens are in raster order (frame, row,
column), so a window in frames (and rows) selects whole runs of tiles: a frame is 2,040 tokens
at 1080p. On CPU the same pattern goes to scaled_dot_product_attention as a boolean mask
(FlexAttention has no backward there).

A model trained with dense attention and sampled through a window is a different model; a
student can be distilled with one (distill.student_video_window). The quality cost of both is
measured by bench/distill_quality.py (docs/performance.md).
"""

import functools
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from model.layout import SequenceLayout

TILE = 128  # FlexAttention's default block size: the granularity at which work is skipped


@dataclass(frozen=True)
class VideoWindow:
    """Half-widths of the window, in latent tokens, on the (t, h, w) axes: a video query at
    (t, h, w) attends to video keys with |dt| <= t, |dh| <= h, |dw| <= w. None: the whole axis."""

    t: int | None = None
    h: int | None = None
    w: int | None = None

    def __post_init__(self):
        for axis in ("t", "h", "w"):
            v = getattr(self, axis)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"VideoWindow.{axis}={v!r}: a half-width is an integer >= 0, or None for the whole axis")
        if self.t is None and self.h is None and self.w is None:
            raise ValueError("VideoWindow: every axis is whole, which is dense attention; use no window instead")

    @classmethod
    def parse(cls, halves) -> "VideoWindow | None":
        """From a config value or a command-line string: None or "none" (dense), or up to three
        half-widths t[,h[,w]], each an integer or "all"/None for the whole axis; "3" is +-3 frames."""
        if halves is None or (isinstance(halves, str) and halves.strip().lower() in ("", "none", "dense")):
            return None
        if isinstance(halves, int):  # video_window=3 on the command line
            halves = [halves]
        items = halves.split(",") if isinstance(halves, str) else list(halves)
        if not 1 <= len(items) <= 3:
            raise ValueError(f"VideoWindow {halves!r}: give one to three half-widths t[,h[,w]]")

        def half(v):
            if v is None or (isinstance(v, str) and v.strip().lower() == "all"):
                return None
            try:
                return int(v) if isinstance(v, str) else v
            except ValueError:
                raise ValueError(f"VideoWindow {halves!r}: {v!r} is not an integer half-width or 'all'") from None

        return cls(*(half(v) for v in items))

    @property
    def halves(self) -> list:
        """[t, h, w] (None: the whole axis): how a checkpoint's description stores it; parse() reads it back."""
        return [self.t, self.h, self.w]

    def __str__(self):
        return "x".join("all" if v is None else str(v) for v in (self.t, self.h, self.w))


def _video_tokens(layout: SequenceLayout, device=None) -> torch.Tensor:
    """(N,) bool: which tokens are video."""
    return torch.cat([torch.full((n,), s.modality == "video", dtype=torch.bool, device=device)
                      for s, n in zip(layout.segments, layout.lengths)])


def window_mask_mod(layout: SequenceLayout, window: VideoWindow, device, key_mask: torch.Tensor | None = None):
    """The mask as FlexAttention's mask_mod(b, h, q, k) -> bool (True: attend)."""
    video = _video_tokens(layout, device)
    pos = layout.positions_on(device)  # (N, 3): video tokens at (frame + t_offset, row, column)
    axes = [(pos[:, i].contiguous(), half) for i, half in enumerate((window.t, window.h, window.w)) if half is not None]
    keys = None if key_mask is None else key_mask.to(device=device, dtype=torch.bool)

    def mask_mod(b, h, q, k):
        # Video positions are whole numbers (plus one offset per segment): half + 0.5 is exact.
        near = functools.reduce(torch.logical_and, [(coord[q] - coord[k]).abs() <= half + 0.5 for coord, half in axes])
        allowed = ~(video[q] & video[k]) | near
        return allowed if keys is None else allowed & keys[b, k]

    return mask_mod


def window_block_mask(layout: SequenceLayout, window: VideoWindow, device: torch.device, key_mask: torch.Tensor | None = None) -> BlockMask:
    """The block mask of `window` over `layout`'s tokens, for FlexAttention (a GPU's path).
    Without a key mask it depends on the layout alone and is cached: a sampler builds it once
    and reuses it for every step and layer."""
    return _made_once(_block_mask, layout, window, torch.device(device), key_mask)


def window_dense_mask(layout: SequenceLayout, window: VideoWindow, device: torch.device, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same pattern as a (B or 1, 1, N, N) boolean mask for scaled_dot_product_attention:
    what the CPU runs (exact, fast at CPU sizes, and with a backward, which FlexAttention lacks
    on CPU). N^2 booleans: not for GPU-sized sequences. Cached like the block mask."""
    return _made_once(_dense_mask, layout, window, torch.device(device), key_mask)


def _made_once(make, layout, window, device, key_mask):
    if key_mask is None:
        return _cached(make, layout, window, device)
    return make(layout, window, device, key_mask)


@functools.lru_cache(maxsize=16)
def _cached(make, layout, window, device):
    return make(layout, window, device, None)


def _dense_mask(layout, window, device, key_mask) -> torch.Tensor:
    n = layout.n_tokens
    with torch.inference_mode(False):
        return create_mask(window_mask_mod(layout, window, device, key_mask), 1 if key_mask is None else key_mask.shape[0], 1, n, n, device=device)


def _block_mask(layout, window, device, key_mask) -> BlockMask:
    n = layout.n_tokens
    batch = None if key_mask is None else key_mask.shape[0]
    # On a GPU the mask is evaluated tile by tile in a compiled kernel; the plain path would first
    # materialise all N^2 pairs (4e9 at 1080p).
    create = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    with torch.inference_mode(False):  # a mask made while sampling must still serve a training forward
        return create(window_mask_mod(layout, window, device, key_mask), batch, None, n, n, device=device, BLOCK_SIZE=TILE)


@functools.cache
def _compiled_create_block_mask():
    return torch.compile(create_block_mask)  # PyTorch 2.11's advice, for its deprecated _compile=True


@functools.lru_cache(maxsize=32)
def attended_pairs(layout: SequenceLayout, window: VideoWindow | None) -> float:
    """(query, key) pairs one sample's attention computes under the window (N^2 without one):
    the attention FLOPs the window leaves (train/flops.py), tiles aside."""
    n = layout.n_tokens
    if window is None:
        return float(n * n)
    n_video = int(_video_tokens(layout).sum())
    return float(n * n - n_video * n_video * (1.0 - video_pairs_kept(layout, window)))


def video_pairs_kept(layout: SequenceLayout, window: VideoWindow) -> float:
    """Fraction of (video query, video key) pairs inside the window: the sparsity of the pattern
    itself, before tiling. Exact when the video tokens form one (t, h, w) grid (a T2V clip, or
    I2V's conditioning frame plus the generated ones), axis by axis."""
    pos = layout.positions[_video_tokens(layout)]
    kept = 1.0
    for i, half in enumerate((window.t, window.h, window.w)):
        if half is None:
            continue
        values, counts = pos[:, i].unique(return_counts=True)
        near = (values[:, None] - values[None, :]).abs() <= half + 0.5
        kept *= float(counts.double() @ near.double() @ counts.double()) / float(counts.sum()) ** 2
    return kept


def computed_fraction(mask: BlockMask) -> float:
    """Fraction of the score matrix's tiles that are computed (1.0 for dense attention).
    BlockMask.sparsity() divides by N^2 rather than by whole tiles, which misreads short
    sequences whose last tile is partial."""
    computed = mask.kv_num_blocks.sum()
    if mask.full_kv_num_blocks is not None:
        computed = computed + mask.full_kv_num_blocks.sum()
    return computed.item() / mask.kv_indices.numel()
