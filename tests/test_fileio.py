"""guided_diffusion/fileio.py: atomic writes (old file kept on failure or kill, no temporary left), the JSON and CSV
writers, and the sweeper of temporary files."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from guided_diffusion import fileio



def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "f.bin")
    fileio.atomic_write(path, lambda f: f.write(b"old content, longer"))
    fileio.atomic_write(path, lambda f: f.write(b"new"))
    assert open(path, "rb").read() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = str(tmp_path / "f.bin")
    fileio.write_bytes(path, b"good")

    def half_then_fail(f):
        f.write(b"torn")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fileio.atomic_write(path, half_then_fail)
    assert open(path, "rb").read() == b"good"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_killed_write_keeps_the_old_file_and_its_temporary_is_swept(tmp_path):
    path = str(tmp_path / "f.bin")
    fileio.write_bytes(path, b"good")
    # A process killed (SIGKILL: no cleanup runs) in the middle of writing the new content.
    child = textwrap.dedent(f"""
        import os, signal
        from guided_diffusion import fileio

        def write(f):
            f.write(b"torn")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        fileio.atomic_write({path!r}, write)
    """)
    result = subprocess.run([sys.executable, "-c", child], env=dict(os.environ))
    assert result.returncode == -signal.SIGKILL
    assert open(path, "rb").read() == b"good"
    leftovers = [name for name in os.listdir(tmp_path) if name != "f.bin"]
    assert len(leftovers) == 1 and fileio.is_temporary(leftovers[0])

    with pytest.warns(UserWarning, match="interrupted write"):
        assert fileio.remove_temporaries(str(tmp_path)) == leftovers
    assert os.listdir(tmp_path) == ["f.bin"]


def test_sweeper_removes_only_marked_temporaries(tmp_path):
    keep = [".hidden", "model.pt", f"not-hidden{fileio.TEMPORARY_MARKER}1", ".tmp", ".gitignore"]
    remove = [f".model.pt{fileio.TEMPORARY_MARKER}123", f".grid.png{fileio.TEMPORARY_MARKER}9"]
    for name in keep + remove:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f".a{fileio.TEMPORARY_MARKER}1"
    nested.write_bytes(b"x")
    with pytest.warns(UserWarning):
        assert fileio.remove_temporaries(str(tmp_path)) == sorted(remove)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["sub"])
    assert nested.exists()  # not recursive: each writer sweeps the folders it writes
    assert fileio.remove_temporaries(str(tmp_path / "missing")) == []


def test_temporary_is_beside_the_target_and_marked(tmp_path):
    temporary = fileio.temporary_path(str(tmp_path / "x.json"))
    assert os.path.dirname(temporary) == str(tmp_path)  # same file system: os.replace is a rename
    assert fileio.is_temporary(os.path.basename(temporary))


def test_json_and_csv_writers(tmp_path):
    path = tmp_path / "new" / "r.json"
    fileio.write_json(str(path), {"fid": 1.5, "rows": [1, None]})
    assert json.loads(path.read_text()) == {"fid": 1.5, "rows": [1, None]}
    fileio.write_csv(str(tmp_path / "t.csv"), ["a", "b", "c"], [[1, 1 / 3, None], ["x", 2.0, 3]])
    assert (tmp_path / "t.csv").read_text() == "a,b,c\n1,0.3333333333,\nx,2,3\n"
