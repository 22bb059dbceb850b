"""Atomic writes: a result file (checkpoint, metrics.json, per_image.csv, gallery, prediction) holds either its old
content or its complete new content, never a torn mix, whatever kills the process and wherever the file lives.

The new content goes to a temporary file in the same folder (so the rename never crosses filesystems, as a temp
file in $TMPDIR would on /dev/shm or a network disk, where "rename" becomes a copy that a kill can interrupt), is
fsynced, then os.replace'd over the target, and the folder is fsynced so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

TEMP_MARK = ".tmp-"  # temporary names: .<stem>.tmp-<random><suffix>, hidden, keeping the suffix for format sniffing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Make a rename in `path` durable; best effort: some filesystems (and Windows) cannot fsync a folder."""
    with contextlib.suppress(OSError):
        _fsync(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` for the caller to write (np.save, Image.save, torch.save, open(...)),
    then fsync it and rename it over `path`. If the block raises, the temporary file is removed and `path` keeps its
    old content. The temporary name keeps `path`'s suffix, so writers that pick the format from it still work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}{TEMP_MARK}{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the write or the rename failed
    _fsync_folder(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that atomic_write leaves only when the process is killed mid-write (the target
    itself is intact). Call it before writing into `folder` again, e.g. when a killed run resumes."""
    folder = Path(folder)
    stale = [p for p in folder.glob(f".*{TEMP_MARK}*") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# What to do about the operating-system errors a user can cause or fix, by errno.
_OS_HINTS = {
    errno.ENOSPC: "free space on that disk or choose a folder on another one",
    errno.EDQUOT: "free space within your quota or choose another folder",
    errno.EACCES: "choose a folder you may write (or read), or change its permissions",
    errno.EPERM: "choose a folder you may write (or read)",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOTDIR: "a file stands where a folder is needed; choose another path",
    errno.EISDIR: "a folder stands where a file is needed; choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EFBIG: "the file grew beyond what this system allows (ulimit -f, the file system's limit)",
}


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: the path(s) it names, the system's reason, and what to do about it."""
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    reason = (error.strerror or str(error)).strip().replace("\n", " ")
    hint = _OS_HINTS.get(error.errno)
    text = f"{' -> '.join(paths)}: {reason}" if paths else reason
    return f"{text} ({hint})" if hint else text


def full_disk(path: str | os.PathLike, least: int = 16 << 20) -> str | None:
    """A message when the disk holding `path` has less than `least` bytes free, else None (torch reports a write
    that ran out of space as "unexpected pos" or "file write failed", never naming the disk)."""
    try:
        free = __import__("shutil").disk_usage(Path(path).parent).free
    except OSError:
        return None
    return f"{free / 2**20:.1f} MB free" if free < least else None


def torch_load_cause(error: BaseException) -> str:
    """The reason torch.load(weights_only=True) gave, for a one-line message. A file holding pickled Python objects
    is reported as such; torch's own text advises retrying with weights_only=False, which would run whatever code
    the file carries, and is never shown."""
    text = str(error).strip()
    if "Weights only load failed" in text or "WeightsUnpickler error" in text:
        found = re.search(r"Unsupported (?:global|operand)[^.]*?: (?:GLOBAL )?([\w.<>]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds pickled Python objects{what}, which densediff never unpickles (loading them can run any "
                "code the file carries); use a checkpoint written by train.py, or one saved as plain tensors or "
                "safetensors")
    return text.splitlines()[0] if text else type(error).__name__
