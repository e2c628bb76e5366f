"""Atomic file output: write to a temp file beside the target, then rename, so a crash never
leaves a half-written file under the final name."""

import contextlib
import os
import tempfile
from pathlib import Path

from scp_jax.errors import UserError


def _umask():
    """The process umask, read without changing it where Linux shows it; os.umask can only set it,
    so elsewhere it is set to 0o077 for an instant (tightening, never loosening, other threads' files)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_mode(directory=False):
    """The mode open() or mkdir() would give a new file or folder; mkstemp and mkdtemp give 0600 and
    0700, which would leave every atomic output unreadable to other users."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; rename it onto `path` only on success.

    An OSError of the folder, the temporary file (a full disk) or the rename (onto a folder) is a
    one-line UserError naming `path`.
    """
    path = Path(path)
    if path.is_dir():  # before the caller's work, which the rename would throw away
        raise UserError(f"{path}: cannot write (Is a directory)")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except FileExistsError as err:  # from mkdir: a folder on the way is a file
        raise UserError(f"{path}: cannot write ({err.filename} is not a directory)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)
