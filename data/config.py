"""Settings of the data pipeline: plain dataclasses, built once at the entry point (Hydra
`_target_: data.config.LoaderConfig`); library code takes them as arguments and reads nothing else."""

import math
from dataclasses import dataclass, field

from data.synthetic_captions import LANGUAGES

MISSING_AUDIO = ("silence", "skip")
SHARD_ORDERS = ("epochs", "resampled")
# The aspect ratios the model generates (DESIGN.md section 1), as (width, height) ratios.
ASPECTS = {"16:9": (16, 9), "9:16": (9, 16), "1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4)}


def _round16(x: float) -> int:
    return max(16, int(round(x / 16)) * 16)


def default_buckets(resolution: int) -> list[list]:
    """One bucket per aspect ratio in ASPECTS, each [name, height, width]. `resolution` is the
    short side of the 16:9 bucket (720 -> 1280x720); the other buckets keep about the same pixel
    area (1:1 -> 960x960), so every bucket costs about the same number of tokens. Sizes are
    multiples of 16 (video VAE stride x patch)."""
    area = resolution * resolution * 16 / 9
    buckets = []
    for name, (aw, ah) in ASPECTS.items():
        height = _round16(math.sqrt(area * ah / aw))
        width = _round16(math.sqrt(area * aw / ah))
        buckets.append([name, height, width])
    return buckets


@dataclass
class LoaderConfig:
    """How shards become batches. See docs/data.md for the meaning of every field."""

    # Where: a directory of .tar files, a glob ("/data/av-*.tar") or a brace pattern
    # ("/data/av-{000000..000127}.tar").
    shards: str = "artifacts/synthetic"

    # What one sample is: a clip of clip_seconds, frames taken at fps, audio at sample_rate.
    clip_seconds: float = 2.0
    fps: float = 24.0
    sample_rate: int = 16000
    audio_channels: int = 1  # 1 (mono) or 2 (stereo); other layouts are down/up-mixed to this

    # Aspect-ratio buckets: [[name, height, width], ...]; empty means default_buckets(resolution).
    resolution: int = 64
    buckets: list = field(default_factory=list)

    batch_size: int = 2
    shuffle_buffer: int = 64  # samples held (as tar references, not bytes) for shuffling
    seed: int = 0
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = False
    # "epochs": each worker walks its own shards in a new seeded order every epoch, forever.
    # "resampled": each worker draws its shards with replacement (webdataset.ResampledShards).
    shard_order: str = "epochs"

    # A file without an audio track: "silence" (zeros, audio_mask all False) or "skip".
    missing_audio: str = "silence"
    # Video as uint8 [0, 255] instead of float32 [-1, 1]: 4x less traffic between worker
    # processes at 720p; the consumer then normalises on the GPU.
    video_uint8: bool = False
    # How DataLoader workers start: "forkserver" or "spawn" (clean interpreters) or "fork"
    # (fastest start, but can inherit a lock held by a parent thread and hang).
    worker_start: str = "forkserver"
    # FFmpeg decoder threads per worker process (1: parallelism comes from workers).
    decode_threads: int = 1
    # A stream that skips this many samples in a row is misconfigured (e.g. clip_seconds longer
    # than every clip), not unlucky: the worker raises instead of spinning.
    max_consecutive_skips: int = 1000
    # Per worker and reason, this many skips are logged as warnings; all are counted.
    warn_skips: int = 5

    def __post_init__(self):
        if not self.buckets:
            self.buckets = default_buckets(self.resolution)
        # Hydra hands lists over as ListConfig; keep plain lists of [str, int, int].
        self.buckets = [[str(name), int(h), int(w)] for name, h, w in self.buckets]
        self._check()

    @property
    def num_frames(self) -> int:
        return round(self.clip_seconds * self.fps)

    @property
    def num_audio_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    def _check(self):
        def bad(name, value, why):
            raise ValueError(f"LoaderConfig.{name}={value!r}: {why}")

        if not self.shards:
            bad("shards", self.shards, "give a directory, glob or brace pattern of .tar shards")
        for name in ("clip_seconds", "fps"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "must be > 0")
        for name in ("sample_rate", "batch_size", "shuffle_buffer", "prefetch_factor", "decode_threads",
                     "max_consecutive_skips"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "must be a positive integer")
        if self.num_workers < 0:
            bad("num_workers", self.num_workers, "must be >= 0 (0 decodes in the main process)")
        if self.audio_channels not in (1, 2):
            bad("audio_channels", self.audio_channels, "must be 1 (mono) or 2 (stereo)")
        if self.worker_start not in ("forkserver", "spawn", "fork"):
            bad("worker_start", self.worker_start, "choose forkserver, spawn or fork")
        if self.missing_audio not in MISSING_AUDIO:
            bad("missing_audio", self.missing_audio, f"choose one of {', '.join(MISSING_AUDIO)}")
        if self.shard_order not in SHARD_ORDERS:
            bad("shard_order", self.shard_order, f"choose one of {', '.join(SHARD_ORDERS)}")
        names = [b[0] for b in self.buckets]
        if len(set(names)) != len(names):
            bad("buckets", self.buckets, "bucket names must be unique")
        for name, height, width in self.buckets:
            if height <= 0 or width <= 0 or height % 16 or width % 16:
                bad("buckets", self.buckets, f"bucket {name!r} is {height}x{width}; sizes must be positive multiples of 16")


@dataclass
class SyntheticConfig:
    """The built-in dataset of moving shapes that make sounds (data/synthetic.py)."""

    num_clips: int = 64
    seconds: float = 2.0
    fps: int = 24
    width: int = 128
    height: int = 72
    sample_rate: int = 48000
    audio_channels: int = 1
    clips_per_shard: int = 8
    seed: int = 0
    languages: list = field(default_factory=lambda: ["en", "de", "fr", "es", "zh"])
    # Standard deviation (in 8-bit levels) of per-frame noise added to the picture: 0 gives flat
    # colours that compress to almost nothing; ~4 gives camera-like bitrates (benchmarks).
    noise_std: float = 0.0
    crf: int = 23  # x264 quality
    audio_bitrate: int = 96000
    prefix: str = "synthetic"

    def __post_init__(self):
        self.languages = [str(lang) for lang in self.languages]
        self._check()

    def _check(self):
        def bad(name, value, why):
            raise ValueError(f"SyntheticConfig.{name}={value!r}: {why}")

        for name in ("num_clips", "fps", "sample_rate", "clips_per_shard"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "must be a positive integer")
        if self.seconds < 0.5:
            bad("seconds", self.seconds, "must be >= 0.5 so a clip holds at least one event")
        if self.width < 32 or self.height < 32 or self.width % 2 or self.height % 2:
            bad("width/height", (self.width, self.height), "must be even and >= 32 (h264 4:2:0)")
        if self.audio_channels not in (1, 2):
            bad("audio_channels", self.audio_channels, "must be 1 or 2")
        unknown = [lang for lang in self.languages if lang not in LANGUAGES]
        if unknown or not self.languages:
            bad("languages", self.languages, f"each must be one of {', '.join(LANGUAGES)}")
