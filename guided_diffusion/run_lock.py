"""One run per log dir: an exclusive lock on `<log_dir>/.lock`, held from the start of a run until it ends.

    with run_lock.acquire(log_dir):       # LogDirError naming the other process if another run holds it
        ...                               # train, write checkpoints and logs

The lock is flock(2) on the file `.lock`, which also records the holder (pid, host, start time, command line) for the
message a second run prints. The kernel releases a flock when the last descriptor of it closes: on release(), on any
exit, and when the process is killed, even by SIGKILL, so a dead run leaves no lock behind. The file itself stays
(deleting it would let two runs lock two different files of one name). A process forked by the holder (a DataLoader
worker) shares the lock until it exits too: when the recorded holder has exited on this host, acquire() waits up to
STALE_WAIT_S for such leftovers before it gives up.
In a multi-rank job rank 0 takes the lock for every rank (scripts/image_train.py).

File systems: on a local file system the lock is exact. On NFS, Linux implements flock as a whole-file POSIX lock
that the server arbitrates between clients (NFSv4, or NFSv3 with lockd running); the lock of a client that crashed
is held until the server's lease runs out (NFSv4: about 90 s). An NFS mount with `nolock` or `local_lock=flock`
keeps locks on the client: two runs on one node exclude each other, two runs on two nodes are not detected. Lustre
needs the `flock` mount option (`localflock` is node-local). Where the file system refuses flock altogether the run
goes on unlocked, with a warning.
"""

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import warnings

LOCK_FILE = ".lock"
STALE_WAIT_S = 30.0     # how long a holder that has exited may leave children holding the lock
UNRECORDED_WAIT_S = 2.0  # how long a holder may take between locking the file and recording itself in it
POLL_S = 0.1
MAX_COMMAND_CHARS = 300  # of the holder's command line in the message
# errno values of file systems that do not implement flock (ENOTSUP is EOPNOTSUPP on Linux).
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class LogDirError(ValueError):
    """A log dir this run cannot use: another run holds it, or it cannot be created as a folder."""


class RunLock:
    """A held lock of a log dir; release() (or the end of its with-block) frees it. Idempotent."""

    def __init__(self, path, fd):
        self.path = path
        self._fd = fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # the last descriptor of the lock: the kernel releases it
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


def acquire(log_dir, flag="--log_dir"):
    """Create `log_dir` if needed and lock it for this process.

    :param flag: how the messages name the folder (the command-line flag it came from).
    :raises LogDirError: another process holds the lock (named in the message), or `log_dir` cannot be a folder.
    """
    path = os.path.join(log_dir, LOCK_FILE)
    try:
        os.makedirs(log_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise LogDirError(_unusable_message(log_dir, flag, err)) from None
    try:
        start = time.monotonic()
        while not _try_lock(fd, path):
            holder = read_holder(log_dir)
            waited = time.monotonic() - start
            if (holder is None and waited < UNRECORDED_WAIT_S) or (_exited_here(holder) and waited < STALE_WAIT_S):
                time.sleep(POLL_S)
                continue
            raise LogDirError(_in_use_message(log_dir, flag, holder))
        record = json.dumps(_this_process()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd)


def read_holder(log_dir):
    """{"pid", "host", "started", "command"} last recorded in log_dir's lock file; None when there is none.

    The record stays after its run ends: only a lock that acquire() could not take tells that the process holds it.
    """
    try:
        with open(os.path.join(log_dir, LOCK_FILE)) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"pid", "host", "started", "command"} <= set(holder) else None


def _try_lock(fd, path):
    """Take the flock without waiting: False when another open file holds it; True also where flock is missing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in UNSUPPORTED:
            raise
        warnings.warn(
            f"cannot lock {path} ({err.strerror}): this file system has no flock, so another run writing into the "
            "same folder would not be detected",
            stacklevel=3,
        )
    return True


def _this_process():
    command = shlex.join(sys.argv).replace("\n", "\\n")
    if len(command) > MAX_COMMAND_CHARS:
        command = command[:MAX_COMMAND_CHARS] + "..."
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command}


def _exited_here(holder):
    """Whether the recorded holder ran on this host and has exited (so only processes it forked can hold the lock)."""
    if holder is None or holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's process
        return False
    return False


def _in_use_message(log_dir, flag, holder):
    advice = f"wait for it to end or choose another {flag}"
    if holder is None:
        return f"{flag} {log_dir} is in use by another process, which has not recorded itself in {LOCK_FILE}; {advice}"
    who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    if _exited_here(holder):
        return (
            f"{flag} {log_dir} is still locked by a process that the run which locked it ({who}) left running, "
            f"though pid {holder['pid']} itself has exited (a data-loading worker, say): end that process, or "
            f"choose another {flag}"
        )
    return f"{flag} {log_dir} is in use by another run ({who}); {advice}"


def _unusable_message(log_dir, flag, err):
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _first_non_folder(log_dir)
        if blocker is not None:
            return f"{flag} {log_dir} cannot be created: {blocker} is not a folder; choose another {flag}"
    return f"{flag} {log_dir} cannot be used: {err.strerror} ({err.filename}); choose another {flag}"


def _first_non_folder(path):
    """The nearest of `path` and its parents that exists (or is a dangling link) but is not a folder; else None."""
    path = os.path.abspath(path)
    while True:
        if os.path.lexists(path) and not os.path.isdir(path):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
