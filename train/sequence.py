"""Batch of latents + captions -> the model's segment layout and inputs.

One layout per batch (samples in a batch share shapes). The task decides which segments are
generated and which are clean conditions:
- t2v: text -> video (+ audio)
- i2v: text + first latent video frame (clean) -> remaining frames (+ audio)
- audio is dropped from the sequence when `with_audio` is False (video-only training).
"""

from dataclasses import dataclass

import torch

from model import ModelArgs, Segment, SequenceLayout, encode_bytes

TASKS = ("t2v", "i2v")


@dataclass
class AVSequence:
    layout: SequenceLayout
    inputs: list[torch.Tensor]  # clean latents for every segment (text: byte ids)
    key_mask: torch.Tensor | None  # (B, N) or None when there is no padding
    targets: dict[int, str]  # segment index -> modality, for every `generate` segment


def build_sequence(
    args: ModelArgs,
    captions: list[str],
    text_len: int,
    video: torch.Tensor,
    audio: torch.Tensor | None,
    task: str = "t2v",
    trim_text: bool = False,
) -> AVSequence:
    """video (B, C, T, H, W) latents; audio (B, C, T) latents or None.

    trim_text: cut the text segment to the batch's longest caption (at most text_len), so a batch
    of one has no padding and no key mask (a mask costs cuDNN attention a third of its speed,
    docs/performance.md). Exact only with left padding (ModelArgs.text_padding), where the real
    tokens keep their positions; ignored for right-padded models. The sampler always trims;
    training does by default (RunConfig.trim_text), its compiled blocks then taking the text
    length as a dynamic size."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: choose one of {', '.join(TASKS)}")
    if args.text_input != "bytes":
        raise ValueError(
            "model.text_input='features' needs precomputed text features (latent shards), which this "
            "pipeline does not provide yet; use text_input='bytes'"
        )
    ids, text_mask = encode_bytes(captions, text_len, args.text_padding)
    if trim_text and can_trim_text(args):
        text_len = int(text_mask.sum(dim=1).max())
        ids, text_mask = ids[:, -text_len:], text_mask[:, -text_len:]
    padded = not bool(text_mask.all())  # asked on the host copy: on the GPU it would be a sync
    # non_blocking: a blocking host-to-device copy synchronises the stream (the step stalls)
    ids, text_mask = ids.to(video.device, non_blocking=True), text_mask.to(video.device, non_blocking=True)
    segments = [Segment("text", "condition", (text_len,))]
    inputs = [ids]
    if task == "i2v":
        pt = args.video_patch[0]
        if video.shape[2] < 2 * pt:
            raise ValueError(f"task=i2v needs at least {2 * pt} latent frames, got {video.shape[2]}")
        first, rest = video[:, :, :pt], video[:, :, pt:]
        segments += [Segment("video", "condition", tuple(first.shape[1:])), Segment("video", "generate", tuple(rest.shape[1:]), t_offset=1.0)]
        inputs += [first, rest]
    else:
        segments.append(Segment("video", "generate", tuple(video.shape[1:])))
        inputs.append(video)
    if audio is not None:
        segments.append(Segment("audio", "generate", tuple(audio.shape[1:])))
        inputs.append(audio)
    layout = SequenceLayout(segments, args)
    key_mask = None
    if padded:
        rest = torch.ones(video.shape[0], layout.n_tokens - text_len, dtype=torch.bool, device=video.device)
        key_mask = torch.cat([text_mask, rest], dim=1)
    targets = {i: s.modality for i, s in enumerate(layout.segments) if s.role == "generate"}
    return AVSequence(layout, inputs, key_mask, targets)


def can_trim_text(args: ModelArgs) -> bool:
    """Whether captions cut to their own length give what the padded, masked ones give: only when
    they are padded on the left (ModelArgs.text_padding), so the real tokens keep their positions."""
    return args.text_padding == "left"


def segment_timesteps(seq: AVSequence, t: torch.Tensor) -> torch.Tensor:
    """Per-sample flow time t (B,) -> the model's per-segment timesteps (B, n_segments): t on
    generate segments, 0 on conditions. Built on t's device (no host-to-device copy)."""
    zero = torch.zeros_like(t)
    return torch.stack([t if s.role == "generate" else zero for s in seq.layout.segments], dim=1)


def sequence_length(args: ModelArgs, text_len: int, video_shape: tuple, audio_shape: tuple | None) -> int:
    """Tokens of a t2v sequence (text + video + audio) from latent shapes (C, T, H, W) and (C, S)
    alone, as build_sequence would lay it out: what the resolution-dependent shift is computed on."""
    segments = [Segment("text", "condition", (text_len,)), Segment("video", "generate", tuple(video_shape))]
    if audio_shape is not None:
        segments.append(Segment("audio", "generate", tuple(audio_shape)))
    return SequenceLayout(segments, args).n_tokens


def tokens_per_sample(args: ModelArgs, codec, clip_seconds: float, fps: float, sample_rate: int, height: int, width: int, text_len: int) -> int:
    """Sequence length of one training clip (text + video + audio), from the clip's size."""
    video = codec.video_latent_shape(round(clip_seconds * fps), height, width)
    audio = codec.audio_latent_shape(round(clip_seconds * sample_rate))
    return sequence_length(args, text_len, video, audio)
