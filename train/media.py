"""Write generated clips as mp4 (h264 video + aac audio) with PyAV."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, padded to even H and W (yuv420p needs it)."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_av_mp4(path, video: torch.Tensor, fps: float, audio: torch.Tensor | None, sample_rate: int) -> Path:
    """video (3, T, H, W) and audio (C, S), both in [-1, 1]; C = 1 (mono) or 2 (stereo)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8_frames(video)
    with av.open(str(path), mode="w") as container:
        vstream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        vstream.options = {"crf": "18", "preset": "veryfast"}
        astream = None
        if audio is not None:
            layout = {1: "mono", 2: "stereo"}.get(audio.shape[0])
            if layout is None:
                raise ValueError(f"write_av_mp4: audio has {audio.shape[0]} channels; only mono or stereo can be written")
            astream = container.add_stream("aac", rate=sample_rate, layout=layout)
        for frame in frames:
            container.mux(vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(vstream.encode())
        if astream is not None:
            wave = audio.float().clamp(-1, 1).cpu().numpy().astype(np.float32)
            chunk = 1024
            for start in range(0, wave.shape[1], chunk):
                part = np.ascontiguousarray(wave[:, start : start + chunk])
                aframe = av.AudioFrame.from_ndarray(part, format="fltp", layout=astream.layout.name)
                aframe.sample_rate = sample_rate
                aframe.pts = start
                aframe.time_base = Fraction(1, sample_rate)
                container.mux(astream.encode(aframe))
            container.mux(astream.encode())
    return path
