"""Atomic file writes for checkpoints and run records.

A file is written beside its destination as ``.tmp-*`` (:data:`TEMP_FILE_PREFIX`), flushed, fsync'ed and
renamed over it, so that a crash while writing never leaves a truncated file behind. A run killed in the
middle of a write leaves its ``.tmp-*`` file: :func:`remove_stale_temp_files` deletes those at the next
start.
"""
import logging
import os
import tempfile
from typing import List

__all__ = ["TEMP_FILE_PREFIX", "atomic_write", "atomic_write_bytes", "remove_stale_temp_files"]

logger = logging.getLogger(__name__)

# Name prefix of the files being written atomically (renamed when complete).
TEMP_FILE_PREFIX = ".tmp-"


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str, write):
    """Writes ``path`` atomically: ``write(f)`` fills a temporary file beside it, which is flushed, fsync'ed
    and renamed over ``path``; on any error the temporary file is removed and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=TEMP_FILE_PREFIX, suffix=os.path.basename(path), dir=directory)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_bytes(path: str, data: bytes):
    """Writes ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temp_files(directory: str) -> List[str]:
    """Deletes the ``.tmp-*`` files that interrupted atomic writes (a killed run) left in ``directory``.

    Call it before anything is written there (at the start of a run): a write in progress has such a file.

    Returns:
        the paths removed.
    """
    if not directory or not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(TEMP_FILE_PREFIX) and os.path.isfile(path) and not os.path.islink(path):
            size = os.path.getsize(path)
            os.remove(path)
            removed.append(path)
            logger.info("Removed %s (%.1f MiB), left by an interrupted checkpoint write", path, size / 2 ** 20)
    return removed
