"""Deterministic WebDataset tar writer with its DALI index, written atomically.

Tar headers carry no time, owner or host details, so the same samples give byte-identical shards on
any machine and for any number of build workers."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TAR_BLOCK = 512
INDEX_VERSION = "v1.2"


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (`.<name>.tmp-<pid>`, what a rerun of the build clears) for any writer to
    fill: pyarrow, PyAV, an ffmpeg process. When the block ends it is fsynced and renamed over `path`, so readers
    see the old file or the whole new one; when the block raises it is removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as written:  # fsync reaches the file's data whichever descriptor wrote it
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


class ShardWriter:
    """Collects samples in memory (shards are bounded by `--shard-size`) and writes tar + idx."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.GNU_FORMAT)
        self._index: list[list[tuple[str, int, int, str]]] = []
        self.keys: list[str] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; `members` maps extension to bytes, written in the given order."""
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r} in one shard")
        entries = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // TAR_BLOCK) * TAR_BLOCK
            entries.append((ext, self._tar.offset - padded, len(data), name))
        self._index.append(entries)
        self.keys.append(key)

    def __len__(self) -> int:
        return len(self.keys)

    def finish(self) -> tuple[bytes, bytes]:
        """Close the archive; returns (tar bytes, index bytes in the format `wds2idx` writes)."""
        self._tar.close()
        lines = [f"{INDEX_VERSION} {len(self._index)}"]
        for entries in self._index:
            lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in entries))
        return self._buf.getvalue(), ("\n".join(lines) + "\n").encode()


def write_shard(tar_path: Path, writer: ShardWriter) -> tuple[str, int]:
    """Write the index, then the tar (its presence marks the shard done); returns (sha256, bytes)."""
    tar_bytes, idx_bytes = writer.finish()
    atomic_write_bytes(tar_path.with_suffix(".idx"), idx_bytes)
    atomic_write_bytes(tar_path, tar_bytes)
    return hashlib.sha256(tar_bytes).hexdigest(), len(tar_bytes)


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
