"""Text -> video + audio: the teacher's Euler sampler on the shifted schedule with classifier-free
guidance, or the distilled student's few-step sampler (train/dmd.py: predict x0, re-noise).

Guidance is per modality (video and audio get their own scales) and written in the standard form
uncond + s * (cond - uncond). With both scales at 1 the unconditional pass is skipped, so an
8-step student costs exactly 8 network evaluations and a 50-step guided teacher 100.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from model import AVTransformer
from train.codec import PatchCodec
from train.dmd import student_sample
from train.flow import cfg_combine, euler_sample, sampling_schedule, shift_for_tokens
from train.sequence import build_sequence, can_trim_text, segment_timesteps, sequence_length


@dataclass
class ClipSpec:
    """What to generate, in pixels and samples."""

    frames: int
    height: int
    width: int
    fps: float
    sample_rate: int
    audio_samples: int  # 0: no audio

    @classmethod
    def from_seconds(cls, seconds: float, fps: float, height: int, width: int, sample_rate: int, with_audio: bool = True):
        return cls(round(seconds * fps), height, width, fps, sample_rate, round(seconds * sample_rate) if with_audio else 0)


@dataclass
class Guidance:
    video: float = 1.0
    audio: float = 1.0

    @property
    def active(self) -> bool:
        return self.video != 1.0 or self.audio != 1.0


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per clip, so a seed gives the same clip on any device and in any batch."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def latent_noise(codec: PatchCodec, spec: ClipSpec, generators: list[torch.Generator], device) -> list[torch.Tensor]:
    """Starting noise, [video, audio] latents, each clip's from its own generator."""
    shapes = [codec.video_latent_shape(spec.frames, spec.height, spec.width)]
    if spec.audio_samples:
        shapes.append(codec.audio_latent_shape(spec.audio_samples))
    per_clip = [[torch.randn(shape, generator=g) for shape in shapes] for g in generators]
    return [torch.stack([noise[i] for noise in per_clip]).to(device) for i in range(len(shapes))]


def make_velocity_fn(model: AVTransformer, captions: list[str], text_len: int, guidance: Guidance, trim_text: bool = False):
    """A velocity(xs, t) over [video, audio] latents. t is a float (euler_sample) or a (B,) tensor
    (train/dmd.py's callables). Guided, cond and uncond run as one batched forward; with
    trim_text (build_sequence) as two, each with its captions cut to their own length, so neither
    needs a padding mask (the empty caption is 2 tokens, the prompt many). Right-padded models
    (older files) cannot be trimmed and keep the one batched forward."""
    b = len(captions)
    trim_text = trim_text and can_trim_text(model.args)

    def forward(prompts, video, audio, tb) -> list[torch.Tensor]:
        seq = build_sequence(model.args, prompts, text_len, video, audio, task="t2v", trim_text=trim_text)
        preds = model(seq.inputs, seq.layout, segment_timesteps(seq, tb), seq.key_mask)
        # video first, then audio; float32, so guidance combines them without bf16 rounding
        return [preds[i].float() for i in sorted(seq.targets)]

    def velocity(xs: list[torch.Tensor], t: float | torch.Tensor) -> list[torch.Tensor]:
        video, audio = xs[0], (xs[1] if len(xs) > 1 else None)
        tb = t.to(video.device) if torch.is_tensor(t) else torch.full((b,), t, device=video.device)
        if not guidance.active:
            return forward(captions, video, audio, tb)
        if trim_text:
            cond, uncond = forward(captions, video, audio, tb), forward([""] * b, video, audio, tb)
        else:
            two = lambda x: torch.cat([x, x]) if x is not None else None  # noqa: E731
            outs = forward(list(captions) + [""] * b, two(video), two(audio), two(tb))
            cond, uncond = [o[:b] for o in outs], [o[b:] for o in outs]
        scales = [guidance.video, guidance.audio]
        return [cfg_combine(c, u, s) for c, u, s in zip(cond, uncond, scales)]

    return velocity


def sampling_precision(model: AVTransformer):
    """The forward's precision when sampling outside a training step: bf16 on a GPU, as training
    runs (bf16-mixed), and wherever the weights themselves are bf16 (DeepSpeed's bf16 keeps the
    module in bf16, and float32 latents would not meet them); float32 otherwise (the CPU tests
    and demo). The latents and the sampler's arithmetic stay float32."""
    p = next(model.parameters())
    if p.device.type == "cuda" or p.dtype == torch.bfloat16:
        return torch.autocast(p.device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def generate(
    model: AVTransformer,
    codec: PatchCodec,
    captions: list[str],
    seeds: list[int],
    spec: ClipSpec,
    steps: int,
    guidance: Guidance,
    text_len: int,
    shift: float | None = None,
    flow_shift_args: tuple[int, float, float] | None = None,
    student: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns pixels (B, 3, T, H, W) and waveforms (B, C, S) or None, both in [-1, 1].

    shift: the schedule's shift; if None it is derived from the token count with
    flow_shift_args = (base_tokens, base_shift, max_shift), as in training.
    student: a distilled student's sampler settings ({"steps": K, "timesteps": [...] or None},
    from its checkpoint): its own K-step sampler instead of Euler, each clip re-noised with fresh
    draws from its own seed's generator; `steps` must then equal K."""
    if len(captions) != len(seeds):
        raise ValueError(f"generate: {len(captions)} captions but {len(seeds)} seeds")
    device = next(model.parameters()).device
    generators = seed_generators(seeds)
    noise = latent_noise(codec, spec, generators, device)
    if shift is None:
        n_tokens = sequence_length(model.args, text_len, noise[0].shape[1:], noise[1].shape[1:] if len(noise) > 1 else None)
        shift = shift_for_tokens(n_tokens, *flow_shift_args) if flow_shift_args else 1.0
    velocity = make_velocity_fn(model, captions, text_len, guidance, trim_text=True)
    with sampling_precision(model):
        if student is None:
            latents = euler_sample(velocity, noise, sampling_schedule(steps, shift))
        else:
            schedule = student_schedule(student, shift)
            if steps != len(schedule) - 1:
                raise ValueError(f"steps={steps}: this student was distilled for {len(schedule) - 1} steps")
            # Each clip's re-noising goes on from the generator that drew its starting noise: fresh
            # noise, as in training (a generator seeded again would re-draw the starting noise).
            latents = student_sample(velocity, noise, schedule, generators)
    video = codec.decode_video(latents[0].float())
    audio = codec.decode_audio(latents[1].float()) if len(latents) > 1 else None
    return video, audio


def student_schedule(student: dict, shift: float) -> torch.Tensor:
    """(K + 1,) timesteps of a distilled student: its configured ones plus the final 0, or the
    teacher's shifted K-step schedule for this clip's token count when none were configured."""
    if student.get("timesteps"):
        return torch.tensor([*student["timesteps"], 0.0], dtype=torch.float32)
    return sampling_schedule(int(student["steps"]), shift)
