"""Decode one clip from media bytes with PyAV: choose a window on the video's frame grid, take
frames at the target fps by timestamp, cut exactly the same time window of audio, convert its
channels and resample it, and fit the frames into an aspect-ratio bucket.

Everything that makes a sample unusable raises SkipSample with a reason (data/skips.py)."""

import math
import random
from dataclasses import dataclass

import av
from av.video.reformatter import VideoReformatter
import numpy as np

from data.audio_window import AudioWindow
from data.buckets import Bucket, FrameGeometry, frame_to_bucket, parse_buckets, plan_geometry
from data.config import LoaderConfig
from data.frames import FramePicker
from data.media import audio_stream, open_media, readable_packets, stream_times, video_stream
from data.skips import SkipSample

LAYOUTS = {1: "mono", 2: "stereo"}
# Start decoding this long before the window so the audio decoder (AAC needs one frame of
# history) and the resampler's margin have real samples when the window begins.
PREROLL_SECONDS = 0.2


@dataclass
class ClipSpec:
    """What to cut out of every file (the decoding part of LoaderConfig)."""

    seconds: float
    fps: float
    sample_rate: int
    audio_channels: int
    buckets: list[Bucket]
    missing_audio: str = "silence"
    decode_threads: int = 1

    @classmethod
    def from_config(cls, cfg: LoaderConfig) -> "ClipSpec":
        return cls(cfg.clip_seconds, cfg.fps, cfg.sample_rate, cfg.audio_channels, parse_buckets(cfg.buckets),
                   cfg.missing_audio, cfg.decode_threads)

    @property
    def num_frames(self) -> int:
        return round(self.seconds * self.fps)

    @property
    def num_samples(self) -> int:
        return round(self.seconds * self.sample_rate)


@dataclass
class Clip:
    video: np.ndarray  # uint8 (T, H, W, 3) RGB, H x W = bucket size
    audio: np.ndarray  # float32 (channels, S), S = round(seconds * sample_rate)
    audio_mask: np.ndarray  # bool (S,), True where real audio was decoded
    start: float  # window start on the source timeline, seconds
    bucket: str
    has_audio: bool


def decode_clip(data: bytes, spec: ClipSpec, rng: random.Random) -> Clip:
    """The clip window is drawn from `rng`, so the same rng state gives the same clip."""
    with open_media(data) as container:
        return _decode(container, spec, rng)


def choose_start(start: float, duration: float | None, spec: ClipSpec, rng: random.Random) -> float:
    """A window start on the grid of output frames counted from the first frame, so a source at
    the output rate is sampled exactly on its own frames. A video is too short when it lacks
    more than half an output frame of the requested length."""
    if duration is None:  # nothing declared: take the beginning and let decoding tell
        return start
    slack = duration - spec.seconds
    if slack < -0.5 / spec.fps:
        raise SkipSample("too_short", f"video lasts {duration:.3f} s < clip_seconds={spec.seconds}")
    last_step = max(0, math.floor(slack * spec.fps + 1e-6))
    return start + rng.randint(0, last_step) / spec.fps


def _decode(container: av.container.InputContainer, spec: ClipSpec, rng: random.Random) -> Clip:
    video = video_stream(container)
    audio = audio_stream(container)
    if audio is None and spec.missing_audio == "skip":
        raise SkipSample("no_audio", "missing_audio='skip'")
    video_times = stream_times(video, container)
    start = choose_start(video_times.start, video_times.duration, spec, rng)

    video.thread_count = spec.decode_threads
    if spec.decode_threads > 1:
        video.thread_type = "AUTO"
    sample_aspect = float(video.sample_aspect_ratio) if video.sample_aspect_ratio else 1.0
    geometry: list[FrameGeometry] = []  # planned from the first frame converted (rotation lives on frames)

    reformatter = VideoReformatter()

    def convert(frame: av.VideoFrame) -> np.ndarray:
        if not geometry:
            geometry.append(plan_geometry(frame.width, frame.height, sample_aspect, frame.rotation, spec.buckets))
        return frame_to_bucket(frame, geometry[0], reformatter)

    targets = [start + k / spec.fps for k in range(spec.num_frames)]
    picker = FramePicker(targets, convert)
    fallback_frame_duration = 1 / float(video.average_rate or video.guessed_rate or spec.fps)

    window = resampler = None
    if audio is not None:
        audio_times = stream_times(audio, container)
        window = AudioWindow(start, spec.seconds, audio.codec_context.sample_rate, spec.sample_rate,
                             spec.audio_channels, audio_times.end)
        # Channel layout and sample format only (rate unchanged, so no delay): swresample
        # downmixes 5.1 and friends with proper matrices; torchaudio does the rate.
        resampler = av.AudioResampler(format="fltp", layout=LAYOUTS[spec.audio_channels])

    if start - video_times.start > PREROLL_SECONDS:
        # Jump to the keyframe before the window instead of decoding from the beginning.
        try:
            container.seek(int((start - PREROLL_SECONDS) / video.time_base), stream=video, backward=True)
        except av.error.FFmpegError:
            pass  # no usable index: read from the beginning instead

    reading = _read_window(container, video, audio, picker, window, resampler, fallback_frame_duration)
    if not picker.done:
        _check_video_complete(picker, reading, video_times.end, targets, spec)
    if window is None:
        audio_out, mask = np.zeros((spec.audio_channels, spec.num_samples), np.float32), np.zeros(spec.num_samples, bool)
    else:
        audio_out, mask = window.result()
    return Clip(np.stack(picker.frames), audio_out, mask, start, geometry[0].bucket.name, audio is not None)


@dataclass
class _Reading:
    video_packets: int = 0
    video_errors: int = 0
    last_error: Exception | None = None


def _read_window(container, video, audio, picker: FramePicker, window: AudioWindow | None,
                 resampler: av.AudioResampler | None, fallback_frame_duration: float) -> _Reading:
    """Demux video and audio together (one pass over the file) until both cover the window."""
    reading = _Reading()
    for packet in readable_packets(container, [video] if audio is None else [video, audio]):
        if packet.stream.type == "video":
            reading.video_packets += 1 if packet.size else 0
            if picker.done:
                continue
            try:
                frames = packet.decode()
            except av.error.FFmpegError as error:
                reading.video_errors, reading.last_error = reading.video_errors + 1, error
                continue
            for frame in frames:
                if frame.time is None:
                    raise SkipSample("undecodable", "decoded video frames carry no timestamps")
                duration = float(frame.duration * frame.time_base) if frame.duration else fallback_frame_duration
                picker.push(frame, frame.time, duration)
        elif not window.done:
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue  # an audio gap stays silent and masked off
            for frame in frames:
                for converted in resampler.resample(frame):
                    window.add(converted.to_ndarray(), converted.time if converted.time is not None else frame.time)
        if picker.done and (window is None or window.done):
            break
    return reading


def _check_video_complete(picker: FramePicker, reading: _Reading, declared_end: float | None, targets: list[float],
                          spec: ClipSpec) -> None:
    """End of file before every target frame was taken: the last frame stays on screen until
    its end; if that does not reach the window's end, say why."""
    if picker.finish():
        return
    if reading.video_packets == 0:
        raise SkipSample("zero_frames", "the video stream holds no packets")
    if picker.last_time is None:
        raise SkipSample("undecodable", f"{reading.video_errors} of {reading.video_packets} video packets failed to "
                                        f"decode ({reading.last_error})")
    window_end = targets[-1] + 1 / spec.fps
    if declared_end is not None and declared_end >= window_end - 0.5 / spec.fps:
        raise SkipSample("truncated", f"video data ends at {picker.last_end:.3f} s but the file declares "
                                      f"{declared_end:.3f} s")
    raise SkipSample("too_short", f"video ends at {picker.last_end:.3f} s, the window needs up to {window_end:.3f} s")
