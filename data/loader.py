"""build_loader: the DataLoader the training stages consume.

Each batch is a dict:
  video       float32 (B, 3, T, H, W) in [-1, 1] (uint8 [0, 255] with video_uint8), T = round(clip_seconds * fps)
  audio       float32 (B, audio_channels, S) in [-1, 1], S = round(clip_seconds * sample_rate)
  audio_mask  bool (B, S), True where real audio was decoded
  caption     list[str], one language per sample, drawn deterministically from the seed
  language    list[str]
  key         list[str], the samples' keys in the shards
  meta        list[dict], the samples' json (events, captions, source, ...)
  clip_start  list[float], where each window starts in its source file, seconds
  bucket      str, the aspect bucket (all samples of a batch share it)
  stream      dict, the producing worker's position and cumulative skip counts: hand the batch
              to data.state.StreamState.update in the training step.
"""

from torch.utils.data import DataLoader

from data.config import LoaderConfig
from data.dataset import AVStreamDataset
from data.state import check_resumable


def build_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1, resume: dict | None = None) -> DataLoader:
    """Endless batches for `rank` of `world_size`. resume: StreamState.state_dict() saved by an
    earlier run with the same seed, rank, world_size and num_workers; the stream then continues
    exactly where that run's training step stopped (docs/data.md)."""
    dataset = AVStreamDataset(cfg, rank, world_size, resume)
    if resume:
        check_resumable(resume, dataset.layout())
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole, bucketed batches
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        pin_memory=cfg.pin_memory,
        persistent_workers=False,
        # Workers start from a clean interpreter, not a fork: a fork copies whatever locks the
        # parent's FFmpeg/x264 or OpenMP threads held at that instant, and a worker then hangs
        # on one forever (seen here: an intermittent hang of the 2-worker tests after encoding).
        multiprocessing_context=cfg.worker_start if cfg.num_workers > 0 else None,
    )
