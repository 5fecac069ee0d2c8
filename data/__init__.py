"""Data: WebDataset shards of video with audio -> decoded, aligned, bucketed batches; writing
shards (python -m data.shards); the synthetic dataset (python -m data.synthetic). See docs/data.md."""

from data.config import LoaderConfig, SyntheticConfig, default_buckets
from data.loader import build_loader
from data.skips import REASONS as SKIP_REASONS
from data.skips import SkipSample
from data.state import StreamState

__all__ = ["SKIP_REASONS", "LoaderConfig", "SkipSample", "StreamState", "SyntheticConfig", "build_loader",
           "default_buckets"]
