"""Codecs turn pixels and waveforms into the latents the transformer models, and back.

Every codec has the same small interface (encode/decode for video and audio, latent channels and
rates). `PatchCodec` needs no weights: video is folded space-to-depth (and optionally
time-to-depth) or average-pooled, audio is cut into frames of `audio_hop` samples. Space-to-depth
is exact and invertible, which makes it the codec for tests; pretrained VAEs plug in behind the same interface.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class PatchCodec(nn.Module):
    def __init__(
        self,
        video_spatial: int = 4,
        video_temporal: int = 1,
        audio_hop: int = 160,
        image_channels: int = 3,
        audio_channels: int = 1,
        audio_scale: float = 1.0,
        video_pool: bool = False,
    ):
        super().__init__()
        for name, value in (("video_spatial", video_spatial), ("video_temporal", video_temporal), ("audio_hop", audio_hop)):
            if int(value) <= 0:
                raise ValueError(f"codec.{name}={value}: must be a positive integer")
        self.s, self.tt, self.hop = int(video_spatial), int(video_temporal), int(audio_hop)
        self.image_channels, self.audio_channels = image_channels, audio_channels
        self.audio_scale = float(audio_scale)  # waveforms are quiet; scale them to unit-ish variance
        # video_pool: average-pool blocks instead of folding them into channels. Lossy (decoding
        # upsamples), but a latent pixel then has 3 channels instead of 3*s*s*tt, so a tiny
        # model's tokens are narrower than its width and it can carry the noise it must remove
        # (the CPU demo); the default space-to-depth is exact.
        self.video_pool = bool(video_pool)

    def config(self) -> dict:
        """Constructor arguments, stored in checkpoints so sampling rebuilds the same codec."""
        return {
            "video_spatial": self.s, "video_temporal": self.tt, "audio_hop": self.hop,
            "image_channels": self.image_channels, "audio_channels": self.audio_channels, "audio_scale": self.audio_scale,
            "video_pool": self.video_pool,
        }

    @property
    def video_latent_channels(self) -> int:
        return self.image_channels if self.video_pool else self.image_channels * self.s * self.s * self.tt

    @property
    def audio_latent_channels(self) -> int:
        return self.audio_channels * self.hop

    def video_latent_fps(self, fps: float) -> float:
        return fps / self.tt

    def audio_latent_rate(self, sample_rate: int) -> float:
        return sample_rate / self.hop

    def audio_latents_per_video_frame(self, fps: float, sample_rate: int) -> float:
        return self.audio_latent_rate(sample_rate) / self.video_latent_fps(fps)

    def video_latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self._check_divisible("video frames", frames, self.tt)
        self._check_divisible("video height", height, self.s)
        self._check_divisible("video width", width, self.s)
        return self.video_latent_channels, frames // self.tt, height // self.s, width // self.s

    def audio_latent_shape(self, samples: int) -> tuple[int, int]:
        self._check_divisible("audio samples", samples, self.hop)
        return self.audio_latent_channels, samples // self.hop

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 3*tt*s*s, T/tt, H/s, W/s)."""
        self.video_latent_shape(*pixels.shape[2:])
        if self.video_pool:
            return F.avg_pool3d(pixels, (self.tt, self.s, self.s))
        return rearrange(pixels, "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w", pt=self.tt, ph=self.s, pw=self.s)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        if self.video_pool:
            return F.interpolate(latents, scale_factor=(self.tt, self.s, self.s), mode="trilinear").clamp(-1, 1)
        pixels = rearrange(latents, "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)", pt=self.tt, ph=self.s, pw=self.s)
        return pixels.clamp(-1, 1)

    def encode_audio(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, C, S) in [-1, 1] -> (B, C*hop, S/hop)."""
        self.audio_latent_shape(wave.shape[-1])
        return rearrange(wave, "b c (t p) -> b (c p) t", p=self.hop) * self.audio_scale

    def decode_audio(self, latents: torch.Tensor) -> torch.Tensor:
        wave = rearrange(latents / self.audio_scale, "b (c p) t -> b c (t p)", p=self.hop)
        return wave.clamp(-1, 1)

    def _check_divisible(self, what: str, size: int, factor: int):
        if size % factor:
            raise ValueError(f"codec: {what}={size} is not divisible by {factor}; adjust the data clip/bucket sizes or the codec")
