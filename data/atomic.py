"""Files written whole or not at all."""

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def written_whole(path) -> Iterator[str]:
    """Yields a temporary path next to `path` to write the file into, and renames it over `path`
    when the block ends. Next to it: on the same filesystem, so the rename is atomic (from $TMPDIR
    it may be a copy) and a reader sees the old file or the new one, never part of one. A name of
    its own, so writers of the same file at once do not collide. A write that raises or is
    killed leaves `<path>.<id>.partial`, which is never read as the file."""
    partial = f"{os.fspath(path)}.{uuid.uuid4().hex[:12]}.partial"
    yield partial
    os.replace(partial, path)
