"""The per-worker pipeline as a torch IterableDataset: raw tar samples -> decode (skipping and
counting bad ones) -> bucketed batches, each batch stamped with the worker's stream position and
cumulative skip counts (read by data.state.StreamState in the main process)."""

import logging
from collections import Counter

from torch.utils.data import IterableDataset, get_worker_info

from data.batching import BucketBatcher, collate
from data.config import LoaderConfig
from data.decode import ClipSpec
from data.sample import decode_sample, sample_rng
from data.skips import SkipSample
from data.stream import check_enough_shards, list_shards, raw_samples, shards_for

log = logging.getLogger(__name__)


def fresh_position() -> dict:
    return {"taken": 0, "waiting": [], "skips": {}}


class AVStreamDataset(IterableDataset):
    """Endless bucketed batches for one rank. Worker w of this rank reads only its share of
    the shards (data/stream.py). `resume` is StreamState.state_dict() from an earlier run."""

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int, resume: dict | None = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, cfg.num_workers)  # 0 workers = one stream in the main process
        self.shards = list_shards(cfg.shards)
        check_enough_shards(self.shards, world_size, self.num_workers)
        resume = resume or {}
        self.first_worker = int(resume.get("next_worker", 0))
        self.positions = {int(w): p for w, p in resume.get("workers", {}).items()}

    def layout(self) -> dict:
        """What a saved position is only valid for."""
        return dict(seed=self.cfg.seed, rank=self.rank, world_size=self.world_size, num_workers=self.num_workers)

    def __iter__(self):
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        # DataLoader asks its workers for batches in turn starting at worker 0; after a resume
        # the first one asked must be the stream that was next, so loader worker i plays stream
        # (i + first_worker) mod num_workers.
        worker = (loader_worker + self.first_worker) % self.num_workers
        return self._batches(worker)

    def _batches(self, worker: int):
        cfg = self.cfg
        spec = ClipSpec.from_config(cfg)
        my_shards = shards_for(self.shards, self.rank, self.world_size, worker, self.num_workers)
        position = self.positions.get(worker, fresh_position())
        taken, waiting = position["taken"], set(position["waiting"])
        skips = Counter(position["skips"])
        batcher = BucketBatcher(cfg.batch_size)
        in_a_row = 0
        stream = raw_samples(my_shards, cfg.shard_order, cfg.shuffle_buffer, cfg.seed, self.rank, worker)
        for index, raw in enumerate(stream):
            if index < taken:
                # Fast-forward over what the previous run consumed: tar headers only, except the
                # samples that were waiting in a bucket when it stopped.
                if index in waiting:
                    self._rebuild(batcher, raw, spec, sample_rng(cfg.seed, self.rank, worker, index), index)
                continue
            try:
                sample = decode_sample(raw, spec, sample_rng(cfg.seed, self.rank, worker, index))
            except Exception as error:  # one bad file must never stop a run
                skip = error if isinstance(error, SkipSample) else SkipSample("decode_error", f"{type(error).__name__}: {error}")
                skips[skip.reason] += 1
                in_a_row += 1
                self._report_skip(skip, raw, skips[skip.reason], worker, unexpected=skip is not error)
                self._check_in_a_row(in_a_row, skips, worker)
                continue
            in_a_row = 0
            sample["index"] = index
            full = batcher.add(sample)
            if full is None:
                continue
            batch = collate(full, cfg.video_uint8)
            batch["stream"] = dict(self.layout(), worker=worker, taken=index + 1,
                                   waiting=batcher.waiting_indices(), skips=dict(skips))
            yield batch

    def _rebuild(self, batcher: BucketBatcher, raw: dict, spec: ClipSpec, rng, index: int) -> None:
        try:
            sample = decode_sample(raw, spec, rng)
        except Exception as error:
            log.warning("resume: %s was waiting in a bucket but no longer decodes (%s); the shards changed "
                        "since the checkpoint, so the resumed stream differs from the original", _where(raw), error)
            return
        sample["index"] = index
        batcher.add(sample)

    def _report_skip(self, skip: SkipSample, raw: dict, count: int, worker: int, unexpected: bool) -> None:
        """The first warn_skips skips of each reason are warnings (with the traceback when the
        error was not a known bad-input case, i.e. maybe a bug); the rest are debug lines."""
        level = logging.WARNING if count <= self.cfg.warn_skips else logging.DEBUG
        log.log(level, "%s [rank %d worker %d, %d %s so far]", skip.describe(_where(raw)), self.rank, worker, count,
                skip.reason, exc_info=unexpected and level == logging.WARNING)

    def _check_in_a_row(self, in_a_row: int, skips: Counter, worker: int) -> None:
        if in_a_row >= self.cfg.max_consecutive_skips:
            raise RuntimeError(
                f"rank {self.rank} worker {worker} skipped {in_a_row} samples in a row (counts so far: {dict(skips)}); "
                f"the data or LoaderConfig is wrong, not one file (e.g. clip_seconds={self.cfg.clip_seconds} longer "
                f"than every clip). Fix the cause, or raise LoaderConfig.max_consecutive_skips.")


def _where(raw: dict) -> str:
    return f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"

