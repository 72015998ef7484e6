"""Atomic file and directory writes, and file checksums.

Every file madclip writes goes through here: the bytes land in a temporary file in the same directory, are
fsync'ed, then `os.replace`d over the target, so a crash or Ctrl-C never leaves a half-written file under
the final name. `AtomicDirectory` does the same for a whole directory (a bundle): it is built in a hidden
sibling and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
from typing import IO, Any, Iterator

import numpy as np

from .errors import MadclipError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB


def _fsync_dir(path: str) -> None:
    """Persist a rename on POSIX by fsync'ing the containing directory (best effort elsewhere)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp_file(path: str) -> tuple[int, str]:
    """Create `.{name}.tmp-<8 hex digits>` beside `path` with the default (umask) permissions, unlike mkstemp's 0600."""
    parent, name = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file object; on clean exit its content replaces `path` atomically.

    On any exception (including KeyboardInterrupt) the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    fd, tmp = _create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    """np.save `arr` to `path` atomically (no pickled objects)."""
    with atomic_writer(path) as f:
        np.save(f, np.asarray(arr), allow_pickle=False)


def atomic_save_png(path: str | os.PathLike, pil_image: Any, **save_kwargs: Any) -> None:
    """Save a PIL image as PNG atomically; `save_kwargs` go to `Image.save` (e.g. `pnginfo=`)."""
    with atomic_writer(path) as f:
        pil_image.save(f, format="PNG", **save_kwargs)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (model files can be over a gigabyte)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _unique_sibling(final: str, tag: str) -> str:
    parent, name = os.path.split(final)
    while True:
        cand = os.path.join(parent, f".{name}.{tag}-{secrets.token_hex(4)}")
        if not os.path.lexists(cand):
            return cand


class AtomicDirectory:
    """Build a directory in a hidden sibling (`.{name}.tmp-<8 hex digits>`) and rename it into place on success.

        with AtomicDirectory("out/bundle", force=args.force) as tmp:
            ...write files into tmp...
        # now out/bundle exists, complete

    If `final_path` exists, `__enter__` already raises MadclipError (so a long export fails early) unless
    `force`; with `force` the old one is moved aside, the new one renamed in, then the old one deleted: at no
    moment is there neither. On an exception or KeyboardInterrupt inside the block the temporary directory
    is removed and the exception re-raised; `final_path` is left as it was.
    """

    def __init__(self, final_path: str | os.PathLike, force: bool = False) -> None:
        self.final_path = os.path.abspath(os.fspath(final_path))
        self.force = force
        self.tmp_path: str | None = None

    def _check_exists(self) -> None:
        if os.path.lexists(self.final_path) and not self.force:
            raise MadclipError(f"{self.final_path} exists; use --force to overwrite")

    def __enter__(self) -> str:
        self._check_exists()
        parent = os.path.dirname(self.final_path)
        os.makedirs(parent, exist_ok=True)
        while True:
            tmp = _unique_sibling(self.final_path, "tmp")
            try:
                os.mkdir(tmp)  # default (umask) permissions, unlike mkdtemp's 0700
            except FileExistsError:
                continue
            break
        self.tmp_path = tmp
        return tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        tmp = self.tmp_path
        assert tmp is not None, "AtomicDirectory used without entering"
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return False  # re-raise
        try:
            self._commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return False

    def _commit(self, tmp: str) -> None:
        final = self.final_path
        parent = os.path.dirname(final)
        self._check_exists()  # someone may have created it while we were writing
        if not os.path.lexists(final):
            os.rename(tmp, final)
            _fsync_dir(parent)
            return
        old = _unique_sibling(final, "old")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)  # put the previous one back: never leave neither
            raise
        _fsync_dir(parent)
        try:
            _remove_path(old)
        except OSError as exc:  # the new directory is in place; a leftover is only clutter
            log.warning("could not remove the previous %s (left at %s): %s", final, old, exc)
