"""Reading checkpoint files without trusting them: torch.load with weights_only=True, and one error naming the file.

weights_only=True unpickles tensors and primitive containers only; a file holding any other pickled object (whose
unpickling could run any code) is refused without being unpickled. A file torch cannot read (empty, truncated, another
format) is refused the same way, in one line: torch's own message is replaced, since it advises retrying with
weights_only=False, which must never be done for a file of unknown origin.
"""

import pickle
import re

import torch

from . import dist_util

# What torch.load raises for an empty file (EOFError), a truncated zip (RuntimeError; OSError EINVAL when small),
# another format (KeyError, UnpicklingError) and objects weights_only refuses (UnpicklingError). A missing file, a
# folder or a denied permission are not damage: those OSErrors pass as they are.
_LOAD_ERRORS = (EOFError, RuntimeError, KeyError, pickle.UnpicklingError, OSError)
_ACCESS_ERRORS = (FileNotFoundError, IsADirectoryError, PermissionError)
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
_ZIP_MAGIC = b"PK\x03\x04"


class UnreadableCheckpointError(ValueError):
    """A checkpoint file torch.load(weights_only=True) refuses: empty, truncated, another format, or pickled objects
    other than tensors and primitive containers."""


def read_checkpoint_file(path, flag=""):
    """The object saved at `path`, read on this rank with weights_only=True (dist_util.load_state_dict).

    :param flag: how the user named the file (e.g. "--model_path"), for the message.
    :raises UnreadableCheckpointError: naming the file and what is wrong with it, in one line.
    """
    try:
        return dist_util.load_state_dict(path)
    except _ACCESS_ERRORS:
        raise
    except _LOAD_ERRORS as err:
        # from None: torch's chained message advises weights_only=False.
        raise UnreadableCheckpointError(_unreadable_message(f"{flag} {path!r}".strip(), err)) from None


def torch_file_problem(path):
    """Why torch cannot open the file at `path`, in a few words, or None when it opens.

    A zip-format file is memory-mapped: its structure and pickle are read, not the tensor bytes (torch keeps no
    checksum of them, so reading them would find nothing more); a truncated file has lost the zip's directory.
    :raises FileNotFoundError, IsADirectoryError, PermissionError: as open() does.
    """
    try:
        with open(path, "rb") as file:
            zipped = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except _ACCESS_ERRORS:
        raise
    except _LOAD_ERRORS as err:
        return _load_error_reason(err)
    return None


def _unreadable_message(name, err):
    reason = _load_error_reason(err)
    if _refused_object(err):
        return (
            f"{name} {reason}. Never load a checkpoint you do not trust with weights_only=False; where the weights "
            "were made, save them as a plain state_dict of tensors"
        )
    return f"{name} is not a readable PyTorch checkpoint (empty, truncated or another format): {reason}"


def _load_error_reason(err):
    """What is wrong with a file torch.load refused, in a few words and without torch's advice."""
    refused = _refused_object(err)
    if refused:
        return (
            f"holds a pickled Python object ({refused}) besides tensors and plain containers; it was not loaded, "
            "since unpickling it could run any code"
        )
    detail = _UNPICKLER_ERROR.search(str(err))
    if detail:
        return detail.group(1).strip()
    first = str(err).split(". ")[0].splitlines()[0] if str(err).strip() else "no data"
    return f"{type(err).__name__}: {first}"


def _refused_object(err):
    """The name of the pickled global that weights_only refused to load, or None."""
    refused = _REFUSED_GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
    return refused and refused.group(1)
