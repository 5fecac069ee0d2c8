"""Decoding one clip: frames by timestamp (variable and foreign frame rates), rotation, buckets,
audio window, channel layout, missing or short audio."""

import io
import random

import numpy as np
import pytest

from data.buckets import parse_buckets, plan_geometry
from data.config import LoaderConfig, default_buckets
from data.audio_window import AudioWindow
from data.decode import ClipSpec, choose_start, decode_clip
from data.encode import encode_av
from data.media import open_media, stream_times
from data.probe import probe_media
from data.skips import SkipSample
from data_fixtures import grey_frames, make_clip, onsets, tone_bursts

BUCKETS = parse_buckets(default_buckets(64))


def spec(**overrides) -> ClipSpec:
    settings = dict(seconds=1.0, fps=24, sample_rate=16000, audio_channels=1, buckets=BUCKETS)
    return ClipSpec(**{**settings, **overrides})


def grey_levels(clip) -> np.ndarray:
    return clip.video.astype(np.float32).mean(axis=(1, 2, 3))


def test_default_buckets_cover_the_five_aspects_in_multiples_of_16():
    buckets = {name: (h, w) for name, h, w in default_buckets(720)}
    assert buckets == {"16:9": (720, 1280), "9:16": (1280, 720), "1:1": (960, 960), "4:3": (832, 1104),
                       "3:4": (1104, 832)}
    with pytest.raises(ValueError, match="LoaderConfig.buckets.*multiples of 16"):
        LoaderConfig(buckets=[["odd", 100, 64]])


def test_variable_frame_rate_takes_the_frame_on_screen_at_each_instant():
    times = [0.0, 0.013, 0.1, 0.35, 0.36, 0.52, 0.8, 0.95]
    levels = [20 + 25 * k for k in range(len(times))]
    out = io.BytesIO()
    encode_av(out, grey_frames(len(times), levels=levels), 24, tone_bursts(1.0, 48000, []), 48000, frame_times=times)
    clip = decode_clip(out.getvalue(), spec(), random.Random(0))
    targets = np.arange(24) / 24
    expected = [levels[max(i for i, t in enumerate(times) if t <= target + 1e-6)] for target in targets]
    assert clip.start == 0.0 and clip.video.shape[0] == 24
    assert np.allclose(grey_levels(clip), expected, atol=3)


def test_30_fps_source_is_resampled_to_24_fps_by_timestamp():
    clip = decode_clip(make_clip(seconds=2.0, fps=30), spec(), random.Random(1))
    source_frames = np.floor((clip.start + np.arange(24) / 24) * 30 + 1e-6).astype(int)
    assert np.allclose(grey_levels(clip), (10 * source_frames) % 250, atol=3)


def test_window_is_random_but_reproducible_and_on_the_frame_grid():
    data = make_clip(seconds=3.0)
    starts = {decode_clip(data, spec(), random.Random(seed)).start for seed in range(6)}
    assert len(starts) > 1 and all(abs(s * 24 - round(s * 24)) < 1e-9 and 0 <= s <= 2.0 for s in starts)
    assert decode_clip(data, spec(), random.Random(4)).start == decode_clip(data, spec(), random.Random(4)).start


def test_late_window_after_seek_keeps_audio_and_video_aligned():
    """A window far into a file is reached by seeking; onsets still land where they were written."""
    data = make_clip(seconds=6.0, onsets=[1.0, 4.3, 4.9, 5.5])
    late = next(seed for seed in range(100) if choose_start(0.0, 6.0, spec(seconds=1.5), random.Random(seed)) > 3.5)
    clip = decode_clip(data, spec(seconds=1.5), random.Random(late))
    assert clip.start > 3.5
    expected = [t - clip.start for t in (4.3, 4.9, 5.5) if 0 < t - clip.start < 1.5]
    found = onsets(clip.audio[0], 16000)
    assert len(found) == len(expected) and np.allclose(found, expected, atol=0.002)
    source_frames = np.round((clip.start + np.arange(36) / 24) * 24).astype(int)
    assert np.allclose(grey_levels(clip), (10 * source_frames) % 250, atol=3)
    assert clip.audio_mask.all()


@pytest.mark.parametrize("rotation, bucket, corner", [(90, "9:16", "bottom_left"), (-90, "9:16", "top_right"),
                                                      (180, "16:9", "bottom_right")])
def test_rotation_metadata_is_honoured(rotation, bucket, corner):
    """Coded 128x64 landscape with a white block in its top-left corner; the display matrix
    turns it counterclockwise by `rotation` degrees (FFmpeg's convention)."""
    image = np.zeros((64, 128, 3), np.uint8)
    image[:16, :16] = 255
    out = io.BytesIO()
    encode_av(out, [image] * 24, 24, tone_bursts(1.0, 48000, []), 48000, rotation=rotation)
    clip = decode_clip(out.getvalue(), spec(), random.Random(0))
    assert clip.bucket == bucket
    frame = clip.video[0].mean(axis=2)
    h, w = frame.shape
    corners = {"top_left": frame[: h // 4, : w // 4], "top_right": frame[: h // 4, -w // 4 :],
               "bottom_left": frame[-h // 4 :, : w // 4], "bottom_right": frame[-h // 4 :, -w // 4 :]}
    brightest = max(corners, key=lambda name: corners[name].mean())
    assert brightest == corner


def test_geometry_covers_the_bucket_and_crops_the_centre():
    geometry = plan_geometry(1920, 1080, 1.0, 0, parse_buckets(default_buckets(720)))
    assert geometry.bucket.name == "16:9" and (geometry.scaled_width, geometry.scaled_height) == (1280, 720)
    geometry = plan_geometry(1440, 1080, 1.0, 0, parse_buckets(default_buckets(720)))  # 4:3
    assert geometry.bucket.name == "4:3" and geometry.scaled_width >= 1104 and geometry.scaled_height >= 832
    portrait = plan_geometry(1920, 1080, 1.0, -90, parse_buckets(default_buckets(720)))  # phone video
    assert portrait.bucket.name == "9:16" and portrait.quarter_turns == 3
    anamorphic = plan_geometry(1440, 1080, 4 / 3, 0, parse_buckets(default_buckets(720)))  # HDV: 16:9 shown
    assert anamorphic.bucket.name == "16:9"


def test_frames_are_cropped_into_the_nearest_bucket():
    clip = decode_clip(make_clip(width=96, height=72), spec(), random.Random(0))
    assert clip.bucket == "4:3" and clip.video.shape == (24, 80, 96, 3)


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
def test_audio_has_exactly_clip_seconds_times_rate_samples(rate):
    clip = decode_clip(make_clip(seconds=1.5, onsets=[0.7]), spec(seconds=1.25, sample_rate=rate), random.Random(2))
    assert clip.audio.shape == (1, round(1.25 * rate)) and clip.audio.dtype == np.float32
    assert clip.audio_mask.shape == (round(1.25 * rate),) and clip.audio_mask.all()
    assert np.abs(clip.audio).max() <= 1.0


def test_stereo_source_is_mixed_to_mono_and_mono_is_spread_to_stereo():
    out = io.BytesIO()
    left_only = tone_bursts(1.0, 48000, [0.3], channels=2)
    left_only[1] = 0
    encode_av(out, grey_frames(24), 24, left_only, 48000)
    mono = decode_clip(out.getvalue(), spec(audio_channels=1), random.Random(0))
    assert mono.audio.shape[0] == 1 and 0.15 < np.abs(mono.audio).max() < 0.4  # half of the 0.5 burst
    stereo = decode_clip(make_clip(), spec(audio_channels=2), random.Random(0))
    assert stereo.audio.shape[0] == 2 and np.allclose(stereo.audio[0], stereo.audio[1])


def test_audio_shorter_than_video_is_padded_and_masked():
    clip = decode_clip(make_clip(seconds=1.0, audio_seconds=0.6, onsets=[0.2]), spec(), random.Random(0))
    real = int(clip.audio_mask.sum())
    assert abs(real - 0.6 * 16000) <= 16  # within a millisecond of the audio stream's end
    assert clip.audio_mask[:real].all() and not clip.audio_mask[real:].any()
    assert np.all(clip.audio[:, real:] == 0)


def test_file_without_audio_gives_silence_with_mask_off_or_is_skipped():
    data = make_clip(audio=False)
    clip = decode_clip(data, spec(missing_audio="silence"), random.Random(0))
    assert not clip.has_audio and clip.audio.shape == (1, 16000)
    assert not clip.audio.any() and not clip.audio_mask.any()
    with pytest.raises(SkipSample) as skip:
        decode_clip(data, spec(missing_audio="skip"), random.Random(0))
    assert skip.value.reason == "no_audio"


@pytest.mark.parametrize("container_format, video_codec, audio_codec", [
    ("matroska", "libx264", "aac"), ("webm", "libvpx-vp9", "libopus"), ("mov", "libx264", "aac")])
def test_other_containers_decode_in_sync(container_format, video_codec, audio_codec):
    data = make_clip(seconds=1.0, onsets=[0.5], container_format=container_format, video_codec=video_codec,
                     audio_codec=audio_codec)
    clip = decode_clip(data, spec(), random.Random(0))
    assert clip.video.shape == (24, 80, 80, 3)
    assert np.allclose(onsets(clip.audio[0], 16000), [0.5], atol=0.002)


@pytest.mark.parametrize("container_format", ["matroska", "mp4"])
def test_audio_frames_with_rounded_timestamps_join_without_holes(container_format):
    """Matroska keeps timestamps in whole milliseconds: 1024-sample AAC frames at 48 kHz are each
    up to 0.5 ms off. They must still join sample for sample, with no masked-off holes inside a
    continuous tone."""
    rate = 48000
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)).astype(np.float32)[None]
    out = io.BytesIO()
    encode_av(out, grey_frames(48), 24, tone, rate, container_format=container_format)
    clip = decode_clip(out.getvalue(), spec(sample_rate=rate), random.Random(3))
    assert clip.audio_mask.all()
    # No step where frames overlap or part: the tone's sample-to-sample change stays under its bound.
    assert np.abs(np.diff(clip.audio[0])).max() < 0.5 * 2 * np.pi * 440 / rate * 1.2


def test_audio_window_joins_rounded_timestamps_but_keeps_real_gaps():
    window = AudioWindow(0.0, 0.2, 48000, 48000, 1, None)
    frame = np.ones((1, 1024), np.float32)
    for i in range(9):  # 21.33 ms frames stamped in whole milliseconds; frame 5 lost (a 21 ms gap)
        if i != 5:
            window.add(frame, round(i * 1024 / 48000, 3))
    audio, mask = window.result()
    assert mask[: 5 * 1024].all() and not mask[5 * 1024 : 6 * 1024].any() and mask[6 * 1024 : 9 * 1024].all()


def test_matroska_video_is_judged_by_its_own_duration_when_audio_outlasts_it():
    """Matroska declares no per-stream duration field; the container's spans the longest stream.
    A 3 s video with 4.5 s of audio is complete: its windows decode and the probe accepts it."""
    data = make_clip(seconds=3.0, audio_seconds=4.5, container_format="matroska")
    with open_media(data) as container:
        assert stream_times(container.streams.video[0], container).duration == pytest.approx(3.0)
    assert probe_media(data)["duration"] == pytest.approx(3.0)
    for seed in range(8):
        clip = decode_clip(data, spec(), random.Random(seed))
        assert clip.start <= 2.0 + 1e-6 and clip.audio_mask.all()


def test_matroska_duration_tag_written_by_ffmpeg_is_the_tracks_end_time():
    """FFmpeg's Matroska muxer writes the track's end time as its DURATION tag: a video from 1 s
    to 3 s lasts 2 s, not 3."""
    import fractions

    import av

    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as container:
        video = container.add_stream("mpeg4", rate=24)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        for i in range(48):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = 24 + i, fractions.Fraction(1, 24)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    data = out.getvalue()
    with open_media(data) as container:
        stream = container.streams.video[0]
        assert stream.metadata["DURATION"].startswith("00:00:03") and container.metadata["ENCODER"].startswith("Lavf")
        times = stream_times(stream, container)
    assert times.start == pytest.approx(1.0) and times.duration == pytest.approx(2.0)
    assert probe_media(data)["duration"] == pytest.approx(2.0)
