"""Atomic writes: readers never see a half-written tokenizer file or directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def use_default_mode(path: Path, mode: int) -> None:
    # mkstemp/mkdtemp create private (0600/0700) entries; published files should get the
    # permissions an ordinary open()/mkdir() would give them.
    os.chmod(path, mode & ~_current_umask())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file next to `path`, then rename over it (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        use_default_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; on success publish its files as `out_dir`.

    A new `out_dir` appears with a single rename. If `out_dir` already exists (e.g. an HF
    model directory with weights), each file is moved in with its own atomic rename and
    other files there are left alone. On error nothing is published.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp_dir
        use_default_mode(tmp_dir, 0o777)
        if out_dir.exists():
            for item in sorted(tmp_dir.iterdir()):
                os.replace(item, out_dir / item.name)
        else:
            os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
