"""guided_diffusion/fileio.py: atomic writes (old file kept on failure or kill, no temporary left), the JSON and CSV
writers, the sweeper of temporary files, a full disk, and output paths checked before any work."""

import errno
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


def writes_to_full_device(monkeypatch, name_prefix):
    """Make fileio's temporary files whose name starts with `name_prefix` write to /dev/full, where every write that
    reaches the kernel fails with ENOSPC, as on a full disk (skips the test where there is no /dev/full)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real_open = open

    def open_on_full_device(path, *args, **kwargs):
        if os.path.basename(path).startswith(name_prefix) and fileio.is_temporary(os.path.basename(path)):
            return real_open("/dev/full", *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", open_on_full_device, raising=False)


@pytest.mark.parametrize("writer", ["bytes", "torch.save"])
def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, writer):
    import torch

    path = str(tmp_path / "f.pt")
    fileio.write_bytes(path, b"good")
    writes_to_full_device(monkeypatch, ".f.pt")
    # torch.save reports the failed write as "unexpected pos ...", with the ENOSPC only in the chained exception.
    write = (lambda f: f.write(b"new")) if writer == "bytes" else (lambda f: torch.save(torch.zeros(100_000), f))
    with pytest.raises(fileio.NoSpaceError) as error:
        fileio.atomic_write(path, write)
    assert str(error.value).startswith(f"no space left on device writing {path} (its previous version")
    assert "\n" not in str(error.value) and error.value.errno == errno.ENOSPC
    assert isinstance(error.value, OSError) and isinstance(error.value, ValueError)  # one line from script_main
    assert (tmp_path / "f.pt").read_bytes() == b"good" and os.listdir(tmp_path) == ["f.pt"]


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path):
    def fail(f):
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError) as error:
        fileio.atomic_write(str(tmp_path / "f.bin"), fail)
    assert not isinstance(error.value, fileio.NoSpaceError) and error.value.errno == errno.EIO


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    fileio.check_output_file(str(tmp_path / "new" / "deeper" / "out.json"), "--out")  # folders are created later
    fileio.check_output_dir(str(tmp_path / "a_dir"), "--sample_dir")
    fileio.check_output_dir(str(tmp_path / "new" / "samples"), "--sample_dir")
    with pytest.raises(IsADirectoryError, match="--out '.*a_dir' is a folder; pass the name of a file"):
        fileio.check_output_file(str(tmp_path / "a_dir"), "--out")
    with pytest.raises(NotADirectoryError, match="--out '.*a_file/x.json' cannot be created: .*a_file is a file"):
        fileio.check_output_file(str(tmp_path / "a_file" / "x.json"), "--out")
    with pytest.raises(NotADirectoryError, match="--sample_dir '.*a_file' is a file, not a folder"):
        fileio.check_output_dir(str(tmp_path / "a_file"), "--sample_dir")
    with pytest.raises(NotADirectoryError, match="a_file/sub' cannot be created"):
        fileio.check_output_dir(str(tmp_path / "a_file" / "sub"), "--sample_dir")
