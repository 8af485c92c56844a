"""Training log of rank 0: log.txt, progress.csv (ADM's keys and layout), stdout and optional TensorBoard.

One explicit `Logger` object instead of ADM's global state. Messages go to stdout (through tqdm, so a progress bar
stays intact) and log.txt; scalar rows go to progress.csv, whose header grows when a row brings new keys (older
rows get empty cells, as in ADM), to log.txt and stdout as ADM's key/value table, and to TensorBoard when the
`tensorboard` package is installed. A Logger built with enabled=False (ranks other than 0) does nothing.
"""

import csv
import io
import os

from tqdm.auto import tqdm

from .fileio import atomic_write, no_space_named

LOG_FILE = "log.txt"
PROGRESS_FILE = "progress.csv"


class Logger:
    """Writes the training log into `log_dir`.

    :param log_dir: folder of log.txt / progress.csv (created if missing).
    :param enabled: False makes every method a no-op (use rank == 0).
    :param tensorboard: also write TensorBoard events when the package is importable.
    """

    def __init__(self, log_dir, enabled=True, tensorboard=True):
        self.log_dir = log_dir
        self.enabled = enabled
        self._columns = []
        self._tensorboard = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._log_file = open(os.path.join(log_dir, LOG_FILE), "a")
        self._csv_path = os.path.join(log_dir, PROGRESS_FILE)
        self._columns, _ = self._read_csv()
        if tensorboard:
            self._tensorboard = _tensorboard_writer(log_dir)

    def info(self, message):
        """A line of text: stdout and log.txt."""
        if not self.enabled:
            return
        tqdm.write(message)
        with no_space_named(self._log_file.name):
            self._log_file.write(message + "\n")
            self._log_file.flush()

    def write_scalars(self, scalars, step):
        """One row of named numbers (a dict of floats/ints) at optimizer step `step`."""
        if not self.enabled:
            return
        self.info(_table(scalars))
        self._append_csv_row(scalars)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def close(self):
        if not self.enabled:
            return
        self._log_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def drop_rows_after(self, step):
        """Remove progress.csv rows of steps after `step`: a resumed run rewrites the steps after its checkpoint."""
        if not self.enabled:
            return
        _, rows = self._read_csv()
        kept = [row for row in rows if not row.get("step") or float(row["step"]) <= step]
        if len(kept) != len(rows):
            self._rewrite_csv(kept)

    def _append_csv_row(self, scalars):
        new_columns = [key for key in scalars if key not in self._columns]
        if new_columns or not os.path.exists(self._csv_path):
            _, rows = self._read_csv()
            self._columns += new_columns
            self._rewrite_csv(rows + [scalars])
            return
        with no_space_named(self._csv_path), open(self._csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns, restval="").writerow(scalars)

    def _read_csv(self):
        """(header, rows as dicts of str) of progress.csv; ([], []) when it does not exist yet."""
        return read_csv_table(self._csv_path)

    def _rewrite_csv(self, rows):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self._columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode()
        atomic_write(self._csv_path, lambda f: f.write(data))


def _table(scalars):
    """ADM's stdout layout: a boxed two-column table of keys and values (numbers in %-8.3g)."""
    cells = [(key, f"{value:<8.3g}" if isinstance(value, float) else str(value)) for key, value in scalars.items()]
    key_width = max((len(k) for k, _ in cells), default=0)
    value_width = max((len(v) for _, v in cells), default=0)
    rule = "-" * (key_width + value_width + 7)
    lines = [rule] + [f"| {k:<{key_width}} | {v:<{value_width}} |" for k, v in cells] + [rule]
    return "\n".join(lines)


def _tensorboard_writer(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def read_csv_table(path):
    """(header, rows as {column: str}) of a CSV file; ([], []) when it does not exist."""
    if not os.path.exists(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def read_progress(path):
    """The rows of a progress.csv (or of the one in run folder `path`) as {column: float}, in logged order.

    A column that a row did not log (an empty cell: the column appeared later, or is logged only at some steps)
    is left out of that row.
    :raises FileNotFoundError: no progress.csv there. ValueError: a cell that is not a number.
    """
    if os.path.isdir(path):
        path = os.path.join(path, PROGRESS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; give a progress.csv or the run folder holding it")
    _, rows = read_csv_table(path)
    return [
        {key: _number(value, f"{path}, line {line}, column {key!r}") for key, value in row.items() if value}
        for line, row in enumerate(rows, start=2)
    ]


def _number(text, where):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None
