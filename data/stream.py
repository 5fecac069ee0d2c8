"""Which raw samples one worker reads, in which order: a deterministic function of
(seed, rank, worker) and the shard files, so a resumed run can replay it exactly.

  shards -> this (rank, worker)'s share -> endless shard order -> tar samples -> shuffle buffer
"""

import glob
import itertools
import os
import random
from collections.abc import Iterator

import braceexpand
import webdataset as wds

from data.shard_reader import shard_samples


def list_shards(spec: str) -> list[str]:
    """A directory (all *.tar inside), a glob, a brace pattern ('a-{000..127}.tar'), or several
    of those separated by '::' -> sorted, de-duplicated paths."""
    paths = []
    for part in spec.split("::"):
        for pattern in braceexpand.braceexpand(os.path.expanduser(part)):
            if os.path.isdir(pattern):
                paths += glob.glob(os.path.join(pattern, "*.tar"))
            elif glob.has_magic(pattern):
                paths += glob.glob(pattern)
            elif os.path.exists(pattern):
                paths.append(pattern)
            else:
                raise FileNotFoundError(f"LoaderConfig.shards: {pattern!r} does not exist; write shards with "
                                        f"`python -m data.shards` or `python -m data.synthetic`")
    paths = sorted(set(paths))
    if not paths:
        raise FileNotFoundError(f"LoaderConfig.shards={spec!r} matched no .tar files; write shards with "
                                f"`python -m data.shards` or `python -m data.synthetic`")
    return paths


def shards_for(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This worker's share: the same split as webdataset's split_by_node followed by
    split_by_worker (every shard to exactly one (rank, worker)), with rank and worker passed in
    rather than read from the environment or torch.distributed."""
    of_rank = shards[rank::world_size]
    return of_rank[worker::num_workers]


def check_enough_shards(shards: list[str], world_size: int, num_workers: int) -> None:
    slots = world_size * max(1, num_workers)
    if len(shards) < slots:
        raise ValueError(
            f"{len(shards)} shards cannot feed {world_size} ranks x {max(1, num_workers)} workers: every worker needs "
            f"its own shard. Write more, smaller shards (python -m data.shards --max-shard-bytes, "
            f"SyntheticConfig.clips_per_shard) or lower LoaderConfig.num_workers.")


def shard_order(my_shards: list[str], order: str, seed: int, rank: int, worker: int) -> Iterator[str]:
    """Endless sequence of this worker's shards.
    'epochs': every shard once per epoch, in a new seeded order each epoch.
    'resampled': shards drawn with replacement (webdataset.ResampledShards, deterministic)."""
    if order == "resampled":
        slot = rank * 100_003 + worker  # any injective (rank, worker) -> int works as the worker seed
        sampler = wds.ResampledShards(my_shards, seed=seed, worker_seed=lambda: slot, deterministic=True)
        for item in sampler:
            yield item["url"]
        return
    for epoch in itertools.count():
        shuffled = list(my_shards)
        random.Random(f"shards/{seed}/{rank}/{worker}/{epoch}").shuffle(shuffled)
        yield from shuffled


def raw_samples(my_shards: list[str], order: str, shuffle_buffer: int, seed: int, rank: int,
                worker: int) -> Iterator[dict]:
    """The worker's endless stream of raw samples (tar references, nothing decoded), shuffled
    through a buffer of `shuffle_buffer` samples with a seeded rng."""
    samples = (sample for path in shard_order(my_shards, order, seed, rank, worker) for sample in shard_samples(path))
    rng = random.Random(f"shuffle/{seed}/{rank}/{worker}")
    return wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(samples)
