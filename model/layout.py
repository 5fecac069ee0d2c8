"""The segment layout of a packed sequence: which tokens belong to which modality and role,
and where each token sits on the (t, h, w) rotary axes.

A batch shares one layout (batches are bucketed, so every sample has the same shapes). The
layout lives on the CPU as plain Python, so the model can slice segments without device syncs.

Position rules (see docs/model.md):
- video token (latent frame k, row i, col j) -> (t_offset + k, i, j), in patch units;
- audio token n -> t on the video's token-time axis (fractional), h = w = one past the video grid,
  so an audio token and a video token at the same instant share t;
- image segment number m (0, 1, ...) -> t = -(m + 1), its own (h, w) grid;
- text tokens -> t = negative integers below every image, h = w = 0.
Video and audio never have t < 0, so text and images cannot collide with video.
"""

from dataclasses import dataclass
from functools import cached_property

import torch

from model.args import MODALITIES, ROLES, ModelArgs


@dataclass(frozen=True)
class Segment:
    """One contiguous block of tokens. `shape` is the latent shape without the batch dim:
    video (C, T, H, W), image (C, H, W), audio (C, T), text (L,) bytes or (L, F) features.
    `t_offset` shifts a video/audio segment on the time axis (I2V: the generated frames start at 1)."""

    modality: str
    role: str
    shape: tuple[int, ...]
    t_offset: float = 0.0


@dataclass(frozen=True)
class Run:
    """Consecutive segments processed by one weight set in a block (one modality, or all for shared)."""

    key: str
    start: int
    end: int
    first_segment: int
    lengths: tuple[int, ...]


class SequenceLayout:
    def __init__(self, segments, args: ModelArgs):
        self.segments = tuple(_as_segment(s, i) for i, s in enumerate(segments))
        if not self.segments:
            raise ValueError("layout: needs at least one segment")
        self.args = args
        self.grids = tuple(_token_grid(s, i, args) for i, s in enumerate(self.segments))
        self.lengths = tuple(gt * gh * gw for gt, gh, gw in self.grids)
        self.starts = tuple(sum(self.lengths[:i]) for i in range(len(self.lengths)))
        self.n_tokens = sum(self.lengths)

    def __repr__(self):
        parts = ", ".join(f"{s.modality}/{s.role}{list(s.shape)}" for s in self.segments)
        return f"SequenceLayout({parts}; {self.n_tokens} tokens)"

    def __eq__(self, other):
        return isinstance(other, SequenceLayout) and self.segments == other.segments and self.args == other.args

    def __hash__(self):
        return hash(self.segments)

    def span(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.lengths[i])

    def runs(self, shared: bool) -> tuple[Run, ...]:
        """Group consecutive segments by the weight set that processes them."""
        runs, i = [], 0
        while i < len(self.segments):
            key = "shared" if shared else self.segments[i].modality
            j = i + 1
            while j < len(self.segments) and (shared or self.segments[j].modality == key):
                j += 1
            runs.append(Run(key, self.starts[i], self.starts[j - 1] + self.lengths[j - 1], i, self.lengths[i:j]))
            i = j
        return tuple(runs)

    @cached_property
    def positions(self) -> torch.Tensor:
        """(n_tokens, 3) float32 rotary positions on the (t, h, w) axes, on the CPU."""
        return self.positions_on(torch.device("cpu"))

    def positions_on(self, device: torch.device) -> torch.Tensor:
        """`positions`, built on `device` from sizes alone: no host-to-device copy, which on a GPU
        would stall the host until the queued kernels have run."""
        return torch.cat([self._segment_positions(i, device) for i in range(len(self.segments))])

    def expand(self, per_segment: torch.Tensor) -> torch.Tensor:
        """(B, n_segments) values -> (B, n_tokens), each repeated over its segment's tokens
        (on per_segment's device, with no index tensor to copy there)."""
        return torch.cat([per_segment[:, i, None].expand(-1, n) for i, n in enumerate(self.lengths)], dim=1)

    def _segment_positions(self, i: int, device: torch.device) -> torch.Tensor:
        seg, (gt, gh, gw) = self.segments[i], self.grids[i]

        def arange(n, start=0.0, step=1.0):
            return torch.arange(n, dtype=torch.float32, device=device) * step + start

        def value(v):
            return torch.full((1,), float(v), dtype=torch.float32, device=device)

        if seg.modality == "video":
            return _grid(arange(gt, seg.t_offset), arange(gh), arange(gw))
        if seg.modality == "audio":
            pt = self.args.video_patch[0]
            per_token = self.args.audio_patch / (self.args.audio_latents_per_video_frame * pt)
            vh, vw = self._video_grid_hw
            return _grid(arange(gt, seg.t_offset, per_token), value(vh), value(vw))
        if seg.modality == "image":
            m = sum(1 for s in self.segments[:i] if s.modality == "image")
            return _grid(value(-1.0 - m), arange(gh), arange(gw))
        # text: negative times below every image; earlier text segments sit further back
        below = -float(sum(1 for s in self.segments if s.modality == "image"))
        after = sum(self.lengths[j] for j, s in enumerate(self.segments) if s.modality == "text" and j > i)
        end = below - after
        return _grid(arange(gt, end - gt), value(0), value(0))

    @cached_property
    def _video_grid_hw(self) -> tuple[int, int]:
        grids = [g for s, g in zip(self.segments, self.grids) if s.modality == "video"]
        return (max(g[1] for g in grids), max(g[2] for g in grids)) if grids else (0, 0)


def _grid(t, h, w) -> torch.Tensor:
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)


def _as_segment(s, i: int) -> Segment:
    if isinstance(s, Segment):
        seg = s
    elif isinstance(s, dict):
        seg = Segment(**s)
    else:
        seg = Segment(*s)
    seg = Segment(seg.modality, seg.role, tuple(int(d) for d in seg.shape), float(seg.t_offset))
    if seg.modality not in MODALITIES:
        raise ValueError(f"segment {i}: modality={seg.modality!r} is not one of {', '.join(MODALITIES)}")
    if seg.role not in ROLES:
        raise ValueError(f"segment {i}: role={seg.role!r} is not one of {', '.join(ROLES)}")
    if seg.modality == "text" and seg.role == "generate":
        raise ValueError(f"segment {i}: text can only be a 'condition' segment (the model generates no text)")
    return seg


def _token_grid(seg: Segment, i: int, args: ModelArgs) -> tuple[int, int, int]:
    """Tokens of a segment as a (t, h, w) grid, after patchifying."""
    where = f"segment {i} ({seg.modality})"
    if seg.modality not in args.modalities:
        raise ValueError(f"{where}: modality={seg.modality!r} is not enabled in ModelArgs.modalities={args.modalities}")

    def need(rank, what):
        if len(seg.shape) != rank or min(seg.shape) <= 0:
            raise ValueError(f"{where}: shape={seg.shape} must be {what} with positive sizes")

    def divisible(size, patch, axis):
        if size % patch:
            raise ValueError(f"{where}: shape={seg.shape} has {axis}={size}, not divisible by the patch size {patch}")
        return size // patch

    pt, ph, pw = args.video_patch
    if seg.modality == "video":
        need(4, "(C, T, H, W)")
        c, t, h, w = seg.shape
        _channels(where, seg.shape, c, args.video_channels, "video_channels")
        return divisible(t, pt, "T"), divisible(h, ph, "H"), divisible(w, pw, "W")
    if seg.modality == "image":
        need(3, "(C, H, W)")
        c, h, w = seg.shape
        _channels(where, seg.shape, c, args.video_channels, "video_channels")
        return 1, divisible(h, ph, "H"), divisible(w, pw, "W")
    if seg.modality == "audio":
        need(2, "(C, T)")
        c, t = seg.shape
        _channels(where, seg.shape, c, args.audio_channels, "audio_channels")
        return divisible(t, args.audio_patch, "T"), 1, 1
    if args.text_input == "bytes":
        need(1, "(L,) byte ids (ModelArgs.text_input='bytes')")
    else:
        need(2, "(L, F) features (ModelArgs.text_input='features')")
        _channels(where, seg.shape, seg.shape[1], args.text_feature_dim, "text_feature_dim")
    return seg.shape[0], 1, 1


def _channels(where, shape, got, want, field):
    if got != want:
        raise ValueError(f"{where}: shape={shape} has {got} channels but ModelArgs.{field}={want}")
