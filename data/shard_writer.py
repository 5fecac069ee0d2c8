"""Write samples into numbered tar shards that never exceed a byte limit (unless one sample alone
does). Each shard is written under a temporary name and renamed when complete, so a loader
never reads half a shard."""

import os

import webdataset as wds

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a closed archive to a whole record
TAR_END = 2 * TAR_BLOCK  # two zero blocks end an archive


def _member_bytes(size: int) -> int:
    """Header block + data rounded up to whole blocks (names stay under 100 bytes and mtime is
    an int, so no extra PAX header)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _archive_bytes(content: int) -> int:
    return -(-(content + TAR_END) // TAR_RECORD) * TAR_RECORD


class BoundedShardWriter:
    def __init__(self, out_dir: str, prefix: str, max_bytes: int):
        if max_bytes < TAR_RECORD:
            raise ValueError(f"--max-shard-bytes={max_bytes} is below one tar record ({TAR_RECORD} bytes)")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.max_bytes = out_dir, prefix, max_bytes
        self.shards: list[dict] = []  # {'path', 'samples', 'bytes'} of finished shards
        self.oversize: list[str] = []  # keys that alone exceed max_bytes (each got its own shard)
        self._tar = None
        self._content = 0
        self._samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """members: extension -> bytes, e.g. {'mp4': ..., 'json': ...}."""
        names = [f"{key}.{ext}" for ext in members]
        if any(len(name) >= 100 for name in names):
            raise ValueError(f"sample key {key!r} is too long for a plain tar header; keep keys under 90 characters")
        size = sum(_member_bytes(len(data)) for data in members.values())
        if self._tar is not None and _archive_bytes(self._content + size) > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._open()
        if _archive_bytes(size) > self.max_bytes:
            self.oversize.append(key)
        self._tar.write({"__key__": key, **members})
        self._content += size
        self._samples += 1

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def _path(self) -> str:
        return os.path.join(self.out_dir, f"{self.prefix}-{len(self.shards):06d}.tar")

    def _open(self) -> None:
        self._tar = wds.TarWriter(self._path() + ".tmp", mtime=0)
        self._content = self._samples = 0

    def _finish(self) -> None:
        self._tar.close()
        path = self._path()
        os.replace(path + ".tmp", path)
        self.shards.append({"path": path, "samples": self._samples, "bytes": os.path.getsize(path)})
        self._tar = None
