"""How every script's main() ends on bad input: one line "<script>: error: <message>" on stderr, no traceback.

    @script_main(interrupted="rerun the same command to resume")
    def main(argv=None):
        ...

User errors are the exceptions that bad flags, configs, files or checkpoints raise: ValueError (which includes
AnalysisError and SamplingArgumentError), the OSErrors of a wrong path or permission, EvaluationError, and
pickle.UnpicklingError / EOFError from a truncated or foreign checkpoint, and the FloatingPointError that stops
training whose loss became inf/NaN. They end the script with exit code 1 through
SystemExit(message), so a test calling main() sees the message in SystemExit. Ctrl-C ends it with exit code 130
and, for scripts that resume, how to resume. Any other exception is a bug and raises with its traceback.

In one rank of a multi-process launch (mpiexec with or without `-m mpi4py`, torchrun, srun) every one of these
endings, after printing, ends the whole job: dist_util.end_every_rank aborts the MPI world or exits at once, so no
other rank waits for this one in a collective (docs/clusters.md, "When a rank dies").
"""

import argparse
import functools
import os
import pickle
import sys
import traceback

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    pickle.UnpicklingError,
    EOFError,
    FloatingPointError,  # training stopped because the loss or the weights became inf/NaN (train_util.py)
)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C


def user_errors():
    """USER_ERRORS plus EvaluationError and LaunchError once the modules defining them (guided_diffusion.inception,
    guided_diffusion.dist_util) are loaded.

    A script that never imports a module (and what it imports: clean-fid, torch) cannot raise its error, so it is
    not imported here just to be caught.
    """
    defined = {"guided_diffusion.inception": "EvaluationError", "guided_diffusion.dist_util": "LaunchError"}
    return USER_ERRORS + tuple(getattr(sys.modules[name], error) for name, error in defined.items()
                               if name in sys.modules)


def _several_ranks():
    """dist_util when this process is one rank of several (a script that never imported it launched no group)."""
    dist_util = sys.modules.get("guided_diffusion.dist_util")
    return dist_util if dist_util is not None and dist_util.several_processes() else None


def _exit(status):
    """sys.exit(status) (an exit code, or a message for stderr and code 1); in one rank of several, the whole job."""
    dist_util = _several_ranks()
    if dist_util is not None:
        if isinstance(status, str):
            print(status, file=sys.stderr)
        dist_util.end_every_rank(status if isinstance(status, int) else 1)
    sys.exit(status)


def script_main(interrupted=""):
    """Decorator for a script's main(argv=None): user errors and Ctrl-C end it as described in the module docstring.

    :param interrupted: what to tell the user after Ctrl-C (e.g. how to resume); "" for scripts that do not resume.
    """

    def decorate(main):
        path = main.__globals__["__file__"]
        # A package run with python -m (benchmarks/__main__.py) is named after the package.
        script = os.path.basename(os.path.dirname(path) if os.path.basename(path) == "__main__.py" else path)

        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"\n{script}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
                _exit(INTERRUPTED_EXIT_CODE)
            except user_errors() as err:
                _exit(f"{script}: error: {err}")
            except Exception:
                if _several_ranks() is None:
                    raise
                traceback.print_exc()
                _exit(1)

        return run

    return decorate


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (a missing or malformed flag) are user errors like any other: under
    script_main one line "<script>: error: ..." and exit code 1, instead of argparse's usage text and exit code 2."""

    def error(self, message):
        raise ValueError(f"{message} (see --help)")
