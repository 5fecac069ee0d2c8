"""Read WebDataset tar shards as references: (file, offset, size) per member, found by reading
tar headers only. Bytes are read when a sample is decoded.

Why references instead of webdataset's streaming tar reader: the shuffle buffer then holds a few
bytes per sample instead of whole videos, and resuming a stream can fast-forward through
millions of samples by reading headers alone (docs/data.md, "Resuming"). The price is that
shards must be seekable files (local disk or a parallel file system), not pipes or URLs."""

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from webdataset.tariterators import group_by_keys

from data.skips import SkipSample

SKIP_KEY = "__skip__"  # a pseudo-sample carrying a SkipSample: a shard that broke while reading


@dataclass(frozen=True)
class MemberRef:
    """Where one tar member's bytes are."""

    path: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise SkipSample("truncated", f"tar member {self.name} holds {len(data)} of {self.size} bytes "
                                          f"(the shard {self.path} is cut short)")
        return data


def _members(path: str, broken: list) -> Iterator[dict]:
    """Header-only walk of a tar; a read error ends the walk and is appended to `broken`."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    return
                if info.isreg():
                    yield dict(fname=info.name, data=MemberRef(path, info.name, info.offset_data, info.size), __url__=path)
    except (OSError, tarfile.TarError) as error:
        broken.append(error)


def shard_samples(path: str) -> Iterator[dict]:
    """Samples of one shard: {'__key__', '__url__', ext: MemberRef, ...} grouped by webdataset's
    rule (key = member name up to the first dot). A shard that is empty or breaks while reading
    ends with one pseudo-sample {SKIP_KEY: SkipSample('bad_shard')}, so the failure is counted
    in the stream like any other skipped sample."""
    broken: list = []
    count = 0
    try:
        for sample in group_by_keys(_members(path, broken)):
            count += 1
            yield sample
    except ValueError as error:  # duplicate member names inside one sample
        broken.append(error)
    if broken or count == 0:
        why = f"{type(broken[0]).__name__}: {broken[0]}" if broken else "no samples in the tar"
        yield {"__key__": f"{path}#bad_shard", "__url__": path,
               SKIP_KEY: SkipSample("bad_shard", f"{path} after {count} samples: {why}")}
