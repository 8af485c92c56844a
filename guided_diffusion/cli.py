"""How every script's main() ends on bad input: one line "<script>: error: <message>" on stderr, no traceback.

    @script_main(interrupted="rerun the same command to resume")
    def main(argv=None):
        ...

User errors are the exceptions that bad flags, configs, files or checkpoints raise: ValueError (which includes
AnalysisError and SamplingArgumentError), the OSErrors of a wrong path or permission, EvaluationError, and
pickle.UnpicklingError / EOFError from a truncated or foreign checkpoint. They end the script with exit code 1 through
SystemExit(message), so a test calling main() sees the message in SystemExit. Ctrl-C ends it with exit code 130
and, for scripts that resume, how to resume. Any other exception is a bug and raises with its traceback.
"""

import functools
import os
import pickle
import sys

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    pickle.UnpicklingError,
    EOFError,
)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C


def user_errors():
    """USER_ERRORS plus EvaluationError once guided_diffusion.inception (where it is defined) is loaded.

    Scripts that never import the feature-network module (and clean-fid with it) cannot raise its error, so it is
    not imported here just to be caught.
    """
    inception = sys.modules.get("guided_diffusion.inception")
    return USER_ERRORS + ((inception.EvaluationError,) if inception is not None else ())


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
                sys.exit(INTERRUPTED_EXIT_CODE)
            except user_errors() as err:
                sys.exit(f"{script}: error: {err}")

        return run

    return decorate
