"""guided_diffusion/logger.py: log.txt and progress.csv of rank 0, the progress.csv reader, columns that appear
later, resumed runs dropping rows, and ranks other than 0 writing nothing."""

import os

import pytest

from guided_diffusion.fileio import NoSpaceError
from guided_diffusion.logger import LOG_FILE, PROGRESS_FILE, Logger, read_progress


def test_rows_go_to_progress_csv_and_log_txt(tmp_path, capsys):
    logger = Logger(str(tmp_path / "run"), tensorboard=False)
    logger.info("starting")
    logger.write_scalars({"step": 1, "samples": 8, "loss": 0.5}, step=1)
    logger.write_scalars({"step": 2, "samples": 16, "loss": 0.25}, step=2)
    logger.close()

    lines = (tmp_path / "run" / PROGRESS_FILE).read_text().splitlines()
    assert lines == ["step,samples,loss", "1,8,0.5", "2,16,0.25"]
    assert read_progress(str(tmp_path / "run")) == [
        {"step": 1.0, "samples": 8.0, "loss": 0.5},
        {"step": 2.0, "samples": 16.0, "loss": 0.25},
    ]
    log = (tmp_path / "run" / LOG_FILE).read_text()
    assert log.startswith("starting\n")
    assert "| loss    | 0.25     |" in log  # ADM's key/value table, numbers as %-8.3g
    assert "| loss    | 0.25     |" in capsys.readouterr().out


def test_columns_that_appear_later_grow_the_header_and_leave_earlier_cells_empty(tmp_path):
    logger = Logger(str(tmp_path), tensorboard=False)
    logger.write_scalars({"step": 1, "loss": 1.0}, step=1)
    logger.write_scalars({"step": 2, "loss": 0.5, "fid": 30.0}, step=2)
    logger.write_scalars({"step": 3, "loss": 0.25}, step=3)
    logger.close()

    lines = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    assert lines == ["step,loss,fid", "1,1.0,", "2,0.5,30.0", "3,0.25,"]
    rows = read_progress(str(tmp_path / PROGRESS_FILE))
    assert rows == [{"step": 1.0, "loss": 1.0}, {"step": 2.0, "loss": 0.5, "fid": 30.0}, {"step": 3.0, "loss": 0.25}]


def test_a_resumed_run_continues_the_file_and_drops_rows_after_its_checkpoint(tmp_path):
    first = Logger(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        first.write_scalars({"step": step, "loss": 1.0 / step}, step=step)
    first.close()

    resumed = Logger(str(tmp_path), tensorboard=False)
    resumed.drop_rows_after(2)
    resumed.write_scalars({"step": 3, "loss": 0.1, "fid": 9.0}, step=3)
    resumed.close()
    assert [row["step"] for row in read_progress(str(tmp_path))] == [1.0, 2.0, 3.0]
    assert read_progress(str(tmp_path))[-1] == {"step": 3.0, "loss": 0.1, "fid": 9.0}


def test_other_ranks_write_nothing(tmp_path, capsys):
    logger = Logger(str(tmp_path / "run"), enabled=False)
    logger.info("hello")
    logger.write_scalars({"step": 1, "loss": 1.0}, step=1)
    logger.drop_rows_after(0)
    logger.close()
    assert not os.path.exists(tmp_path / "run")
    assert capsys.readouterr().out == ""


def test_reader_names_the_bad_cell_and_the_missing_file(tmp_path):
    (tmp_path / PROGRESS_FILE).write_text("step,loss\n1,0.5\n2,nan?\n")
    with pytest.raises(ValueError, match=r"line 3, column 'loss': 'nan\?' is not a number"):
        read_progress(str(tmp_path / PROGRESS_FILE))
    with pytest.raises(FileNotFoundError, match="give a progress.csv or the run folder"):
        read_progress(str(tmp_path / "elsewhere"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, whose writes fail with ENOSPC")
def test_a_full_disk_while_appending_log_lines_or_rows_is_one_error_naming_the_file(tmp_path):
    logger = Logger(str(tmp_path), tensorboard=False)
    logger.write_scalars({"step": 1, "loss": 0.5}, step=1)
    logger._log_file.close()
    logger._log_file = open("/dev/full", "a")  # log.txt's appends now hit a full device
    with pytest.raises(NoSpaceError, match="^no space left on device writing /dev/full "):
        logger.info("a line")
    logger._log_file = open(os.devnull, "a")
    logger._csv_path = "/dev/full"  # and so do progress.csv's
    with pytest.raises(NoSpaceError, match="^no space left on device writing /dev/full "):
        logger.write_scalars({"step": 2, "loss": 0.4}, step=2)
