"""Write generated clips as mp4 (h264 video + aac audio): tensors -> data.encode.encode_av, the
same encoder the synthetic dataset is written with."""

from pathlib import Path

import numpy as np
import torch

from data.encode import encode_av


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, padded to even H and W (yuv420p needs it)."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_av_mp4(path, video: torch.Tensor, fps: float, audio: torch.Tensor | None, sample_rate: int) -> Path:
    """video (3, T, H, W) and audio (C, S) or None, both in [-1, 1]; C = 1 (mono) or 2 (stereo)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = None if audio is None else audio.float().clamp(-1, 1).cpu().numpy().astype(np.float32)
    encode_av(str(path), list(to_uint8_frames(video)), fps, wave, sample_rate, crf=18)
    return path
