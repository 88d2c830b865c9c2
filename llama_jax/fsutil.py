"""Atomic file and directory writes: readers never see a half-written file or directory.

The one copy of these helpers (tokenizer files, HF directories, PEFT adapters, llama_jax
checkpoints all use them).  Standard library only: tokenizer and data worker processes import it
without pulling in jax.
"""

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


def use_default_mode(path: str | os.PathLike, mode: int) -> None:
    """Give `path` the permissions an ordinary open() (mode 0o666) or mkdir() (0o777) would give it
    under the current umask: mkstemp/mkdtemp create private (0600/0700) entries."""
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
    """write_bytes_atomic of `text` encoded as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `out_dir` (same filesystem); when the block ends without an
    error, publish it as `out_dir` with the permissions mkdir would give.  On any error (the block's
    or the publishing's) the temp directory is removed and nothing is published.

    A new `out_dir` appears with a single rename.  If `out_dir` already exists:
      replace=False: each file is moved in with its own atomic rename and the directory's other
        files are left alone (e.g. tokenizer files written into an HF model directory);
      replace=True: the whole directory is replaced: the old one is renamed aside, the new one
        renamed into place, then the old one deleted (a model or adapter directory whose old
        files must not survive).  At every moment `out_dir` is either the complete old directory
        or the complete new one (or, after a crash between the two renames, absent with the old
        one kept as `.NAME.old-PID`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp_dir
        use_default_mode(tmp_dir, 0o777)
        if not out_dir.exists():
            os.replace(tmp_dir, out_dir)
        elif replace:
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for item in sorted(tmp_dir.iterdir()):
                os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
