"""Write a video with its audio track through real codecs (PyAV: libx264 + AAC in MP4 by default).
Used by the synthetic dataset, the benchmark and the tests, so all of them exercise the same
decode path as real data."""

import os
import tempfile
from collections.abc import Iterable, Sequence
from fractions import Fraction

import av
import numpy as np

AUDIO_CHUNK = 1024  # samples per frame handed to the encoder (the AAC frame size)
LAYOUTS = {1: "mono", 2: "stereo"}


def encode_av(
    out,
    frames: Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 48000,
    *,
    frame_times: Sequence[float] | None = None,
    container_format: str = "mp4",
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    crf: int = 23,
    preset: str = "veryfast",
    audio_bitrate: int = 96000,
    rotation: int = 0,
    faststart: bool = True,
) -> None:
    """Encode `frames` (uint8 arrays of shape (H, W, 3), RGB) and `audio` (float32 (C, N) in
    [-1, 1], or None for a file without an audio track) into `out` (a path or a writable,
    seekable file object).

    frame_times: presentation time in seconds of each frame, for variable frame rate; by default
    frame k is shown at k / fps. rotation: degrees stored in the display matrix (phone videos).
    faststart: put the MP4 index before the data, as streaming uploads do; a truncated faststart
    file still opens, a truncated plain one does not.
    """
    faststart = faststart and container_format == "mp4"
    if faststart and not isinstance(out, (str, os.PathLike)):
        # The MP4 muxer moves the index to the front by reopening its output by name, so a file
        # object gets the bytes of a temporary file.
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "clip.mp4")
            encode_av(path, frames, fps, audio, sample_rate, frame_times=frame_times, container_format=container_format,
                      video_codec=video_codec, audio_codec=audio_codec, crf=crf, preset=preset,
                      audio_bitrate=audio_bitrate, rotation=rotation, faststart=True)
            with open(path, "rb") as f:
                out.write(f.read())
        return
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(out, mode="w", format=container_format, options=options) as container:
        frames = iter(frames)
        first = next(frames, None)
        video = None
        if first is not None:
            video = container.add_stream(video_codec, rate=Fraction(fps).limit_denominator(1001))
            video.height, video.width = first.shape[:2]
            video.pix_fmt = "yuv420p"
            if video_codec == "libx264":
                video.options = {"crf": str(crf), "preset": preset}
            if frame_times is not None:
                # Fine clock so arbitrary presentation times survive; no B-frames, so decode
                # timestamps (from which MP4 derives sample durations) equal presentation ones.
                video.codec_context.time_base = Fraction(1, 90000)
                if video_codec == "libx264":
                    video.options = {**video.options, "bf": "0"}
            if rotation:
                video.set_display_rotation(rotation)
        stream_audio = None
        if audio is not None:
            if audio.ndim != 2 or audio.shape[0] not in LAYOUTS:
                raise ValueError(f"audio must be (channels, samples) with 1 or 2 channels, got {audio.shape}")
            stream_audio = container.add_stream(audio_codec, rate=sample_rate)
            stream_audio.layout = LAYOUTS[audio.shape[0]]
            stream_audio.bit_rate = audio_bitrate
        container.start_encoding()

        # Interleave by time (audio up to each video frame), as cameras and muxers do, so a cut
        # file loses the end of both streams rather than all of one.
        audio_chunks = _audio_frames(audio, sample_rate) if stream_audio is not None else iter(())
        pending_audio = next(audio_chunks, None)
        if video is not None:
            for index, image in enumerate(_chain(first, frames)):
                shown_at = index / fps if frame_times is None else frame_times[index]
                while pending_audio is not None and pending_audio.pts / sample_rate <= shown_at:
                    container.mux(stream_audio.encode(pending_audio))
                    pending_audio = next(audio_chunks, None)
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                if frame_times is None:
                    frame.pts = index
                else:
                    frame.pts = round(shown_at * 90000)
                    frame.time_base = Fraction(1, 90000)
                    next_at = frame_times[index + 1] if index + 1 < len(frame_times) else shown_at + 1 / fps
                    frame.duration = round(next_at * 90000) - frame.pts
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
        while pending_audio is not None:
            container.mux(stream_audio.encode(pending_audio))
            pending_audio = next(audio_chunks, None)
        if stream_audio is not None:
            container.mux(stream_audio.encode(None))


def _audio_frames(audio: np.ndarray, sample_rate: int):
    samples = np.ascontiguousarray(audio, dtype=np.float32)
    layout = LAYOUTS[samples.shape[0]]
    for begin in range(0, samples.shape[1], AUDIO_CHUNK):
        chunk = np.ascontiguousarray(samples[:, begin : begin + AUDIO_CHUNK])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = begin
        yield frame


def _chain(first, rest):
    yield first
    yield from rest
