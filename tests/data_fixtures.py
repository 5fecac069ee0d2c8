"""Media made in the tests with real encoders (PyAV), good and deliberately broken, plus small
helpers shared by the tests/test_data_*.py files. Nothing binary is committed."""

import io
import json
import struct

import av
import numpy as np
import webdataset as wds

from data.config import LoaderConfig, SyntheticConfig
from data.encode import encode_av
from data.synthetic import write_synthetic_shards


def tone_bursts(seconds: float, sample_rate: int, onsets: list[float], channels: int = 1) -> np.ndarray:
    """Silence with a 40 ms 1 kHz burst starting at each onset (seconds)."""
    audio = np.zeros((channels, round(seconds * sample_rate)), np.float32)
    burst = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(round(0.04 * sample_rate)) / sample_rate)
    for onset in onsets:
        begin = round(onset * sample_rate)
        end = min(audio.shape[1], begin + burst.size)
        audio[:, begin:end] = burst[: end - begin]
    return audio


def grey_frames(count: int, width: int = 64, height: int = 64, levels=None) -> list[np.ndarray]:
    """Flat frames; frame k has grey level levels[k] (default 10 * k), easy to recognise after
    compression."""
    levels = levels if levels is not None else [(10 * k) % 250 for k in range(count)]
    return [np.full((height, width, 3), level, np.uint8) for level in levels]


def make_clip(seconds: float = 1.0, fps: float = 24, width: int = 64, height: int = 64, sample_rate: int = 48000,
              audio: bool = True, audio_seconds: float | None = None, onsets=(0.5,), **encode_options) -> bytes:
    """A small h264 + AAC mp4 (other containers/codecs through encode_options)."""
    frames = grey_frames(round(seconds * fps), width, height)
    sound = tone_bursts(audio_seconds or seconds, sample_rate, list(onsets)) if audio else None
    out = io.BytesIO()
    encode_av(out, frames, fps, sound, sample_rate, **encode_options)
    return out.getvalue()


def noisy_clip(seconds: float = 1.0, fps: float = 24, size: int = 64, **encode_options) -> bytes:
    """Like make_clip but with noisy frames, so video packets are large and spread through the file."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(round(seconds * fps))]
    out = io.BytesIO()
    encode_av(out, frames, fps, tone_bursts(seconds, 48000, [0.5]), 48000, **encode_options)
    return out.getvalue()


# --- broken media, each made from real encoder output -------------------------------------

def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def corrupt_payload(mp4: bytes) -> bytes:
    """Zero every byte of the media data (the 'mdat' box): the container opens, the packets are
    there, none decodes."""
    at = mp4.index(b"mdat")
    size = struct.unpack(">I", mp4[at - 4 : at])[0]
    data = bytearray(mp4)
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    return bytes(data)


def zero_frame_video(seconds: float = 1.0) -> bytes:
    """Matroska with an h264 video stream that holds no frames, and an audio track (MP4 drops
    empty tracks, Matroska keeps them)."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="matroska") as container:
        video = container.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = container.add_stream("aac", rate=48000)
        audio.layout = "mono"
        container.start_encoding()
        samples = tone_bursts(seconds, 48000, [0.5])
        for begin in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, begin : begin + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 48000, begin
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
        container.mux(video.encode(None))
    return out.getvalue()


# --- shards ------------------------------------------------------------------------------------

def caption_json(text: str = "a grey square", **extra) -> bytes:
    return json.dumps({"captions": {"en": text}, **extra}).encode()


def write_shard(path, samples: list[tuple[str, dict]]) -> str:
    """samples: [(key, {extension: bytes})]."""
    with wds.TarWriter(str(path), mtime=0) as tar:
        for key, members in samples:
            tar.write({"__key__": key, **members})
    return str(path)


def synthetic_shards(out_dir, **overrides) -> tuple[SyntheticConfig, list[str]]:
    settings = dict(num_clips=16, seconds=1.5, fps=24, width=64, height=64, clips_per_shard=2, seed=3)
    cfg = SyntheticConfig(**{**settings, **overrides})
    return cfg, write_synthetic_shards(cfg, str(out_dir))


def loader_config(shards, **overrides) -> LoaderConfig:
    settings = dict(shards=str(shards), clip_seconds=1.0, fps=24, sample_rate=16000, resolution=64, batch_size=2,
                    shuffle_buffer=4, num_workers=0, seed=0)
    return LoaderConfig(**{**settings, **overrides})


def take(loader, n: int) -> list[dict]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def onsets(audio: np.ndarray, sample_rate: int, threshold: float = 0.1, quiet_gap: float = 0.1) -> np.ndarray:
    """Start times (seconds) of sounds: first loud sample after at least quiet_gap of quiet."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return np.zeros(0)
    starts = [loud[0]] + [b for a, b in zip(loud[:-1], loud[1:]) if b - a > quiet_gap * sample_rate]
    return np.asarray(starts) / sample_rate

