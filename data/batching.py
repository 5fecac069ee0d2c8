"""Group decoded samples by aspect bucket so every batch has one shape, and stack them."""

import math

import numpy as np
import torch
from torch.utils.data import get_worker_info


class BucketBatcher:
    """Holds samples per bucket; `add` returns a full batch (a list) when its bucket fills.
    Each sample carries 'index' (its place in the worker's stream), so the samples still waiting
    can be named in the resume position and rebuilt after a restart."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.waiting: dict[str, list[dict]] = {}

    def add(self, sample: dict) -> list[dict] | None:
        bucket = self.waiting.setdefault(sample["bucket"], [])
        bucket.append(sample)
        if len(bucket) < self.batch_size:
            return None
        del self.waiting[sample["bucket"]]
        return bucket

    def waiting_indices(self) -> list[int]:
        return sorted(sample["index"] for bucket in self.waiting.values() for sample in bucket)


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor. Inside a DataLoader worker it is allocated in shared memory, as
    torch's default_collate does, so handing it to the main process copies nothing (at 720p a
    float32 clip is 1.3 GB; a second copy costs as much as decoding it)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    prototype = torch.empty(0, dtype=dtype)
    storage = prototype._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return prototype.new(storage).resize_(shape)


def stack_video(clips: list[np.ndarray], as_uint8: bool) -> torch.Tensor:
    """uint8 (T, H, W, 3) clips -> (B, 3, T, H, W), float32 in [-1, 1] or uint8. Converted frame
    by frame so each step works on a few MB that stay in cache."""
    frames, height, width, _ = clips[0].shape
    video = batch_tensor((len(clips), 3, frames, height, width), torch.uint8 if as_uint8 else torch.float32)
    for b, clip in enumerate(clips):
        for t, frame in enumerate(torch.from_numpy(clip)):
            out = video[b, :, t]
            out.copy_(frame.permute(2, 0, 1))
            if not as_uint8:
                out.div_(127.5).sub_(1.0)
    return video


def collate(samples: list[dict], video_uint8: bool) -> dict:
    """Stack into the batch layout of build_loader (see data/loader.py)."""
    return dict(
        video=stack_video([s["video"] for s in samples], video_uint8),
        audio=torch.from_numpy(np.stack([s["audio"] for s in samples])),
        audio_mask=torch.from_numpy(np.stack([s["audio_mask"] for s in samples])),
        caption=[s["caption"] for s in samples],
        language=[s["language"] for s in samples],
        key=[s["key"] for s in samples],
        meta=[s["meta"] for s in samples],
        clip_start=[s["clip_start"] for s in samples],
        bucket=samples[0]["bucket"],
    )
