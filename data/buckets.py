"""Aspect-ratio buckets: pick the bucket nearest a video's displayed shape, then scale the frame
to cover it and centre-crop. Rotation metadata and non-square pixels are honoured."""

import math
from dataclasses import dataclass

import av
from av.video.reformatter import VideoReformatter
import numpy as np


@dataclass(frozen=True)
class Bucket:
    name: str
    height: int
    width: int


def parse_buckets(buckets: list) -> list[Bucket]:
    """[[name, height, width], ...] (LoaderConfig.buckets) -> Buckets."""
    return [Bucket(str(name), int(height), int(width)) for name, height, width in buckets]


def nearest_bucket(display_width: float, display_height: float, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest on a log scale (2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(display_width / display_height)
    return min(buckets, key=lambda b: abs(math.log(b.width / b.height) - aspect))


@dataclass(frozen=True)
class FrameGeometry:
    """How one video's frames become bucket-sized RGB arrays: scale the coded picture to
    scaled_width x scaled_height (coded orientation), rotate by quarter_turns x 90 degrees
    counterclockwise, then crop the bucket out at (crop_top, crop_left)."""

    bucket: Bucket
    quarter_turns: int
    scaled_width: int
    scaled_height: int
    crop_top: int
    crop_left: int


def plan_geometry(coded_width: int, coded_height: int, sample_aspect: float, rotation: float,
                  buckets: list[Bucket]) -> FrameGeometry:
    """rotation: degrees counterclockwise from the display matrix (PyAV VideoFrame.rotation),
    rounded to a quarter turn. sample_aspect: pixel width / height (1 for square pixels)."""
    quarter_turns = round(rotation / 90) % 4
    display_width, display_height = coded_width * sample_aspect, coded_height
    if quarter_turns % 2:
        display_width, display_height = display_height, display_width
    bucket = nearest_bucket(display_width, display_height, buckets)
    # Cover the bucket (no black bars), then crop the overhang evenly.
    scale = max(bucket.width / display_width, bucket.height / display_height)
    shown_width = max(bucket.width, math.ceil(display_width * scale - 1e-6))
    shown_height = max(bucket.height, math.ceil(display_height * scale - 1e-6))
    scaled_width, scaled_height = (shown_height, shown_width) if quarter_turns % 2 else (shown_width, shown_height)
    return FrameGeometry(
        bucket=bucket,
        quarter_turns=quarter_turns,
        scaled_width=scaled_width,
        scaled_height=scaled_height,
        crop_top=(shown_height - bucket.height) // 2,
        crop_left=(shown_width - bucket.width) // 2,
    )


def frame_to_bucket(frame: av.VideoFrame, geometry: FrameGeometry, reformatter: VideoReformatter) -> np.ndarray:
    """uint8 (bucket.height, bucket.width, 3) RGB. Scaling and colour conversion happen in one
    swscale call; AREA when shrinking avoids aliasing, BICUBIC when enlarging.

    Pass one `VideoReformatter` for all frames of a clip: it keeps its swscale context while the
    geometry stays the same, whereas VideoFrame.reformat builds a new one per frame, which costs
    far more than the scaling itself for small frames (the effect on 720p is in
    bench/results/data_throughput_*.json)."""
    shrinking = geometry.scaled_width * geometry.scaled_height < frame.width * frame.height
    rgb = reformatter.reformat(
        frame,
        width=geometry.scaled_width,
        height=geometry.scaled_height,
        format="rgb24",
        interpolation="AREA" if shrinking else "BICUBIC",
    ).to_ndarray()
    if geometry.quarter_turns:
        rgb = np.rot90(rgb, k=geometry.quarter_turns)
    bucket = geometry.bucket
    crop = rgb[geometry.crop_top : geometry.crop_top + bucket.height, geometry.crop_left : geometry.crop_left + bucket.width]
    return np.ascontiguousarray(crop)
