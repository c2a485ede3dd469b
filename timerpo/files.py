"""Atomic writes whose results get the usual permissions, and the one PNG encoding that they write.

`tempfile.mkstemp` and `mkdtemp` create 0600 files and 0700 folders, and safetensors writes its files 0600
too, so a result renamed into place from one of them stays private whatever the umask says. The
temporaries here are created with modes 0666 and 0777 instead and the kernel applies the umask (and a
folder's default ACL, where there is one), exactly as for a plain `open(path, "w")` or `os.makedirs`.
Files written by others are given the mode a new file gets, found by creating one: reading the umask
with os.umask means setting it, which races with other threads.
"""
from __future__ import annotations

import io
import os
import secrets
import shutil

FILE_MODE = 0o666  # before the umask, like open()
DIR_MODE = 0o777  # before the umask, like os.makedirs()


def create_unique(folder: str, prefix: str, create) -> tuple:
    """Call create(path) on fresh random names in `folder` until one was free; return (path, its result)."""
    for _ in range(100):
        path = os.path.join(folder, prefix + secrets.token_hex(6))
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name with prefix {prefix!r} in {folder}")


def new_file(path: str) -> int:
    """Create `path` (it must not exist) for writing, with open()'s usual mode; return the descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)


def make_temp_dir(parent: str, prefix: str = ".tmp-") -> str:
    """A new empty folder in `parent` (hidden name), with the mode os.makedirs would give it."""
    return create_unique(parent, prefix, lambda path: os.mkdir(path, DIR_MODE))[0]


def usual_file_mode(folder: str) -> int:
    """The permission bits open() gives a new file in `folder` (0666 less the umask, e.g. 0644 under 022)."""
    probe, fd = create_unique(folder, ".mode-", new_file)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.remove(probe)


def set_usual_modes(folder: str) -> None:
    """Give every file under `folder` the mode a new file there would get (safetensors leaves 0600)."""
    mode = usual_file_mode(folder)
    for parent, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(parent, name), mode)


def replace_dir(src: str, dst: str) -> None:
    """Put folder src at dst. A crash at any point leaves either the old dst or the new one in place."""
    if not os.path.exists(dst):
        os.replace(src, dst)
        return
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to path so that readers see the old or the new content, never a mix.

    The data goes to a temporary file beside `path`, is flushed to disk, then renamed over `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp, fd = create_unique(folder, ".tmp-", new_file)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def png_bytes(img) -> bytes:
    """A PIL image as deterministic PNG bytes (no metadata, fixed zlib level 6), ready for write_atomic."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
