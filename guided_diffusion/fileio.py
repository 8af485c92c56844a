"""Atomic file writing, used by every file this package writes (checkpoints, logs, samples, figures, tables).

`atomic_open` / `atomic_write` write a hidden temporary file beside the target (its name holds `TEMPORARY_MARKER`),
fsync it and rename it over the target, so a reader, a crash or a SIGKILL only ever leaves the old file or the
complete new one. A killed write leaves its temporary file behind; `remove_temporaries` deletes such files from a
folder before a run writes there again, and nothing else.

A write that fails for want of space (ENOSPC, or EDQUOT: quota) raises `NoSpaceError` naming the file, whatever
the writer raised (torch.save reports a full disk as "unexpected pos ..."); the old file is kept. `check_output_file`
and `check_output_dir` refuse an output path that cannot be written before any work is done.
"""

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import warnings

TEMPORARY_MARKER = ".tmp-"
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class NoSpaceError(OSError, ValueError):
    """A write that ran out of space (errno ENOSPC or EDQUOT); the file it was replacing is unchanged.

    Also a ValueError, so that the scripts report it in one line like other user errors (guided_diffusion/cli.py).
    """

    def __init__(self, path, code):
        super().__init__(
            f"{_NO_SPACE[code]} writing {path} (its previous version, if any, is unchanged): free some space and run "
            "the command again"
        )
        self.errno = code


def temporary_path(path):
    """The hidden temporary file `atomic_write` uses for `path` in this process: .NAME.tmp-PID beside it."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{TEMPORARY_MARKER}{os.getpid()}")


def is_temporary(name):
    """Whether a file name is one of `atomic_write`'s temporary files."""
    return name.startswith(".") and TEMPORARY_MARKER in name


@contextlib.contextmanager
def atomic_open(path):
    """A binary file object for writing `path`; the target is replaced only when the block ends without an error.

    Readers only ever see the old or the complete new content. A blobfile URL (gs://, az://) is uploaded in one
    piece, which is atomic there.

    :raises NoSpaceError: when the device or the quota is full, whatever the writer raised about it.
    """
    if "://" in path:
        import blobfile

        with blobfile.BlobFile(path, "wb") as f:
            yield f
        return
    temporary = temporary_path(path)
    try:
        with no_space_named(path), open(temporary, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    _fsync_directory(os.path.dirname(temporary))


@contextlib.contextmanager
def no_space_named(path):
    """Within the block, a write that runs out of space (however the writer reports it) raises NoSpaceError naming
    `path`; other errors pass unchanged. For files appended in place (log.txt, progress.csv) as for atomic writes."""
    try:
        yield
    except Exception as err:
        code = _no_space_errno(err)
        if code is None:
            raise
        raise NoSpaceError(path, code) from err


def _no_space_errno(err):
    """ENOSPC or EDQUOT where `err` or an exception it was raised from or during is an OSError with that errno."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err.errno
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path, write):
    """Write `path` atomically (see `atomic_open`): `write` is called with a binary file object open for writing."""
    with atomic_open(path) as f:
        write(f)


def _fsync_directory(directory):
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path, data):
    """Write bytes `data` to `path` (atomically)."""
    atomic_write(path, lambda f: f.write(data))


def write_text(path, text):
    """Write a str as UTF-8 (atomically)."""
    write_bytes(path, text.encode())


def write_json(path, obj):
    """Write `obj` as indented JSON (atomically), creating the parent folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path, header, rows):
    """A CSV with `header` and `rows` (sequences of values), atomically; floats written with 10 significant
    digits, None as an empty cell."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"{v:.10g}" if isinstance(v, float) else ("" if v is None else v) for v in row])
    write_text(path, text.getvalue())


def remove_temporaries(directory):
    """Delete the temporary files that killed `atomic_write`s left in `directory` (not recursive), with a warning
    each; other files, hidden or not, are kept. Call it on one rank, before any rank writes there.

    :return: the names removed.
    """
    if not os.path.isdir(directory):
        return []
    removed = sorted(name for name in os.listdir(directory) if is_temporary(name))
    for name in removed:
        warnings.warn(f"removing {name} from {directory}: a temporary file of an interrupted write", stacklevel=2)
        os.remove(os.path.join(directory, name))
    return removed


def file_sha256(path):
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_file(path, flag):
    """Refuse, before any work is done, an output file that cannot be written: `path` is a folder, or the nearest
    existing folder above it is a file or read-only. Folders missing on the way are left to the writer to create.

    :param flag: how the user gave the path (e.g. "--out"), for the message.
    """
    if "://" in path:
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path!r} is a folder; pass the name of a file to write")
    _check_writable_ancestor(os.path.dirname(os.path.abspath(path)), flag, path)


def check_output_dir(path, flag):
    """Refuse, before any work is done, an output folder that cannot be written: `path` is a file, or it (or the
    nearest existing folder above it) is a file or read-only. See `check_output_file`."""
    if "://" in path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path!r} is a file, not a folder; pass a folder (created if missing)")
    _check_writable_ancestor(os.path.abspath(path), flag, path)


def _check_writable_ancestor(folder, flag, path):
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{flag} {path!r} cannot be created: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path!r} cannot be written: no write permission in {folder}")
