"""Atomic writes, checkpoint files, pruning, random-state capture, resume lookup and checks, fingerprints.

The files are the reference's (docs/compatibility.md, "Training loop") plus the state file that fixes its defects
#3-#5 ("Reference defects fixed here")."""

import os
import random

import numpy as np
import pytest
import torch

from guided_diffusion import checkpoint, fileio

RATES = ["0.9999", "0.999"]


def _state(step, value=0.0, config=None):
    """A small training state whose tensors hold `value`."""
    weights = {"w": torch.full((2, 3), value), "b": torch.full((3,), value)}
    return checkpoint.training_state(
        step=step,
        model=weights,
        ema={rate: {k: v + 1 for k, v in weights.items()} for rate in RATES},
        optimizer={"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        grad_scaler={},
        schedule_sampler={},
        rng=[checkpoint.capture_rng_state()],
        data={"epoch": 0, "batch_index": step},
        config=config or {"num_channels": 32, "image_size": 16, "lr": 1e-4},
    )


def test_save_checkpoint_writes_reference_files_and_state(tmp_path):
    log_dir = str(tmp_path)
    checkpoint.save_checkpoint(log_dir, _state(10, value=2.0))
    assert sorted(os.listdir(log_dir)) == sorted(
        ["ema_0.999_000010.pt", "ema_0.9999_000010.pt", "model000010.pt", "opt000010.pt", "state000010.pt"]
    )
    model = torch.load(tmp_path / "model000010.pt", weights_only=True)
    ema = torch.load(tmp_path / "ema_0.9999_000010.pt", weights_only=True)
    assert torch.equal(model["w"], torch.full((2, 3), 2.0)) and torch.equal(ema["w"], torch.full((2, 3), 3.0))
    state = torch.load(tmp_path / "state000010.pt", weights_only=True)
    assert checkpoint.is_training_state(state) and state["step"] == 10
    assert checkpoint.complete_steps(log_dir) == [10]


def test_complete_checkpoint_is_never_overwritten(tmp_path):
    checkpoint.save_checkpoint(str(tmp_path), _state(4, value=1.0))
    with pytest.raises(FileExistsError, match="state000004.pt"):
        checkpoint.save_checkpoint(str(tmp_path), _state(4, value=5.0))
    assert torch.load(tmp_path / "model000004.pt", weights_only=True)["w"][0, 0] == 1.0


def test_incomplete_checkpoint_is_replaced_with_a_warning(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model000004.pt")  # an interrupted write left no state file
    with pytest.warns(UserWarning, match="model000004.pt"):
        checkpoint.save_checkpoint(str(tmp_path), _state(4, value=1.0))
    assert torch.load(tmp_path / "model000004.pt", weights_only=True)["w"][0, 0] == 1.0


def test_prune_keeps_newest_complete_checkpoints(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save_checkpoint(str(tmp_path), _state(step))
    torch.save({}, tmp_path / "model000008.pt")  # incomplete and newer: not counted, not deleted
    assert checkpoint.prune_checkpoints(str(tmp_path), keep=0) == []
    assert checkpoint.prune_checkpoints(str(tmp_path), keep=2) == [2]
    assert checkpoint.complete_steps(str(tmp_path)) == [4, 6]
    assert sorted(checkpoint.checkpoint_files_by_step(str(tmp_path))) == [4, 6, 8]
    assert checkpoint.prune_checkpoints(str(tmp_path), keep=1) == [4]
    assert checkpoint.complete_steps(str(tmp_path)) == [6]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    torch.save(checkpoint.capture_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.randn(3), random.random())
    checkpoint.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_resume_from_state_file_and_from_log_dir(tmp_path):
    for step in (2, 4):
        checkpoint.save_checkpoint(str(tmp_path), _state(step, value=float(step)))
    torch.save({}, tmp_path / "model000006.pt")  # incomplete: the log dir resumes from step 4
    for path in (tmp_path / "state000004.pt", tmp_path):
        point = checkpoint.load_resume_point(str(path), RATES)
        assert point.step == 4 and point.state["data"] == {"epoch": 0, "batch_index": 4}
        assert torch.equal(point.model["w"], torch.full((2, 3), 4.0))
        assert sorted(point.ema) == sorted(RATES) and point.optimizer is not None


def test_resume_from_reference_model_file_warns_for_each_missing_file(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model000300.pt")
    torch.save({"w": torch.full((2,), 7.0)}, tmp_path / "ema_0.9999_000300.pt")
    with pytest.warns(UserWarning) as caught:
        point = checkpoint.load_resume_point(str(tmp_path / "model000300.pt"), RATES)
    messages = " ".join(str(w.message) for w in caught)
    assert "rate 0.999;" in messages and "opt000300.pt not found" in messages and "not exact" in messages
    assert point.step == 300 and point.state is None and point.optimizer is None
    assert list(point.ema) == ["0.9999"] and point.ema["0.9999"]["w"][0] == 7.0


@pytest.mark.parametrize("name", ["ema_0.9999_000300.pt", "opt000300.pt", "ffhq_p2.pt"])
def test_files_that_do_not_tell_their_step_fail_loudly(tmp_path, name):
    torch.save({"w": torch.ones(2)}, tmp_path / name)
    with pytest.raises(ValueError, match="cannot tell which step"):
        checkpoint.load_resume_point(str(tmp_path / name), RATES)


def test_renamed_state_file_still_resumes_at_its_stored_step(tmp_path):
    checkpoint.save_checkpoint(str(tmp_path), _state(8))
    os.rename(tmp_path / "state000008.pt", tmp_path / "best.pt")
    assert checkpoint.load_resume_point(str(tmp_path / "best.pt"), RATES).step == 8


def test_resume_names_every_changed_flag_outside_may_change_and_returns_the_allowed_ones(tmp_path):
    saved = {"num_channels": 32, "p2_gamma": 1.0, "dropout": 0.0, "lr": 1e-4, "max_steps": 2, "log_dir": "a"}
    checkpoint.save_checkpoint(str(tmp_path), _state(2, config=saved))
    may_change = {"max_steps", "log_dir", "num_workers"}
    changed = {**saved, "num_channels": 64, "p2_gamma": 0.5, "lr": 2e-5, "dropout": 0, "max_steps": 4, "log_dir": "b"}
    with pytest.raises(ValueError) as error:
        checkpoint.load_resume_point(str(tmp_path), RATES, config=changed, may_change=may_change)
    message = str(error.value)
    for expected in ("--num_channels 32 in the checkpoint vs 64 now", "--p2_gamma 1.0 in the checkpoint vs 0.5 now",
                     "--lr 0.0001 in the checkpoint vs 2e-05 now"):
        assert expected in message
    assert "--dropout 0" not in message and "--max_steps 2" not in message and "--log_dir" not in message
    # Only flags of may_change differ: the resume goes ahead and reports them; keys of one config alone are skipped.
    allowed = {**saved, "max_steps": 4, "log_dir": "b", "new_flag": 1}
    point = checkpoint.load_resume_point(str(tmp_path), RATES, config=allowed, may_change=may_change)
    assert point.step == 2 and point.changed_flags == [("log_dir", "a", "b"), ("max_steps", 2, 4)]
    # Without may_change every flag must match.
    with pytest.raises(ValueError, match="--max_steps 2 in the checkpoint vs 4 now"):
        checkpoint.load_resume_point(str(tmp_path), RATES, config=allowed)


def test_reference_files_are_checked_against_config_yaml_beside_them(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model000002.pt")
    checkpoint.save_config(str(tmp_path), {"num_res_blocks": 1})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="--num_res_blocks 1"):
        checkpoint.load_resume_point(str(tmp_path / "model000002.pt"), [], config={"num_res_blocks": 2})


def test_check_log_dir_refuses_newer_checkpoints_and_removes_temporaries(tmp_path):
    checkpoint.save_checkpoint(str(tmp_path), _state(6))
    with pytest.raises(FileExistsError, match="step\\(s\\) 6"):
        checkpoint.check_log_dir(str(tmp_path), start_step=0)
    (tmp_path / f".model000008.pt{fileio.TEMPORARY_MARKER}123").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="interrupted write"):
        checkpoint.check_log_dir(str(tmp_path), start_step=6)
    assert not any(fileio.TEMPORARY_MARKER in name for name in os.listdir(tmp_path))


def test_auto_resume_finds_the_newest_complete_checkpoint_else_a_fresh_start(tmp_path):
    assert checkpoint.resolve_auto_resume(str(tmp_path / "not_yet")) == ""
    assert checkpoint.resolve_auto_resume(str(tmp_path)) == ""
    checkpoint.save_checkpoint(str(tmp_path), _state(2))
    checkpoint.save_checkpoint(str(tmp_path), _state(4))
    # Newer but incomplete: a reference model file without its state file, and a killed write's temporary file.
    torch.save({"w": torch.zeros(1)}, tmp_path / "model000006.pt")
    (tmp_path / f".state000008.pt{fileio.TEMPORARY_MARKER}123").write_bytes(b"torn")
    assert checkpoint.resolve_auto_resume(str(tmp_path)) == str(tmp_path / "state000004.pt")


def test_missing_resume_path_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_resume_point(str(tmp_path / "nope.pt"), RATES)
    with pytest.raises(FileNotFoundError, match="without checkpoints"):
        checkpoint.load_resume_point(str(tmp_path), RATES)


def test_fingerprint_of_a_state_dict_is_unchanged_and_tells_every_bit():
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0]),
             "n": torch.tensor(3)}
    # Sample folders record this value to recognise their checkpoint; it must not change between versions.
    assert checkpoint.state_dict_fingerprint(state) == (
        "494598709e8c0181b27b1459834d08287a20e2bfa973ea30236f54e65dd09bf3"
    )
    flipped = {**state, "b": torch.tensor([1.5, -2.0]).view(torch.int32).bitwise_xor(1).view(torch.float32)}
    renamed = {"w": state["w"], "b2": state["b"], "n": state["n"]}
    reshaped = {**state, "w": state["w"].reshape(3, 2)}
    fingerprints = {checkpoint.state_dict_fingerprint(s) for s in (state, flipped, renamed, reshaped)}
    assert len(fingerprints) == 4


def test_fingerprint_of_nested_states_covers_tensors_and_primitives():
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                 "param_groups": [{"lr": 1e-4, "params": [0]}]}
    copy = {"state": {0: {k: v.clone() for k, v in optimizer["state"][0].items()}},
            "param_groups": [{"lr": 1e-4, "params": [0]}]}
    assert checkpoint.state_dict_fingerprint(optimizer) == checkpoint.state_dict_fingerprint(copy)
    copy["param_groups"][0]["lr"] = 2e-4
    assert checkpoint.state_dict_fingerprint(optimizer) != checkpoint.state_dict_fingerprint(copy)
    # Order and nesting count: the same tensors in another order or structure are another state.
    zeros, ones = torch.zeros(2), torch.ones(2)
    fingerprints = {checkpoint.state_dict_fingerprint(s) for s in ([zeros, ones], [ones, zeros], [[zeros], ones])}
    assert len(fingerprints) == 3


# ----------------------------------------------------------------------------------------------------------------
# Unreadable files: one error naming the file; a resume from a folder falls back to the newest readable checkpoint


def truncate_file(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class WritesAFileWhenUnpickled:
    """Pickles as a call of open(marker, "w"): unpickling it with weights_only=False would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "pickled object"])
def test_unreadable_checkpoint_file_is_one_error_naming_it(tmp_path, damage):
    file = tmp_path / "model000002.pt"
    path, marker = str(file), tmp_path / "code_ran"
    torch.save({"w": torch.ones(100)}, path)
    if damage == "truncated":
        truncate_file(file)
    elif damage == "pickled object":
        torch.save({"w": WritesAFileWhenUnpickled(str(marker))}, path)
    else:
        file.write_bytes({"empty": b"", "text": b"not a checkpoint"}[damage])
    with pytest.raises(checkpoint.UnreadableCheckpointError) as error:
        checkpoint.read_checkpoint_file(path, "--model_path")
    message = str(error.value)
    assert message.startswith(f"--model_path {path!r} ") and "\n" not in message
    # torch's advice to retry with weights_only=False is never passed on.
    assert "will likely succeed" not in message and "add_safe_globals" not in message
    if damage == "pickled object":
        assert "pickled Python object (io.open)" in message and "not loaded" in message
        assert "Never load a checkpoint you do not trust with weights_only=False" in message
        assert not marker.exists()
    else:
        assert "is not a readable PyTorch checkpoint" in message


def test_resume_names_an_unreadable_file_and_the_folder_to_resume_from(tmp_path):
    for step in (2, 4):
        checkpoint.save_checkpoint(str(tmp_path), _state(step, value=float(step)))
    truncate_file(tmp_path / "state000004.pt")
    with pytest.raises(checkpoint.UnreadableCheckpointError) as error:
        checkpoint.load_resume_point(str(tmp_path / "state000004.pt"), RATES)
    assert "state000004.pt' is not a readable PyTorch checkpoint" in str(error.value)
    assert f"--resume_checkpoint {tmp_path} resumes from the newest readable checkpoint" in str(error.value)


@pytest.mark.parametrize("damaged", ["state000004.pt", "model000004.pt", "ema_0.999_000004.pt", "opt000004.pt"])
@pytest.mark.parametrize("how", ["folder", "auto"])
def test_resume_from_a_folder_skips_a_newest_checkpoint_with_an_unreadable_file(tmp_path, damaged, how):
    for step in (2, 4):
        checkpoint.save_checkpoint(str(tmp_path), _state(step, value=float(step)))
    truncate_file(tmp_path / damaged)
    resolve = checkpoint.resolve_auto_resume if how == "auto" else checkpoint.newest_readable_checkpoint
    with pytest.warns(UserWarning, match=f"{tmp_path / damaged} is unreadable .*skipping checkpoint 4"):
        resolved = resolve(str(tmp_path))
    assert resolved == str(tmp_path / "state000002.pt")
    point = checkpoint.load_resume_point(str(tmp_path if how == "folder" else resolved), RATES)
    assert point.step == 2 and torch.equal(point.model["w"], torch.full((2, 3), 2.0))
    # Step 4 is set aside whole, so training can write it again; nothing of it is lost.
    names = os.listdir(tmp_path)
    assert checkpoint.complete_steps(str(tmp_path)) == [2]
    assert list(checkpoint.checkpoint_files_by_step(tmp_path)) == [2]
    step_4 = ["ema_0.999_000004.pt", "ema_0.9999_000004.pt", "model000004.pt", "opt000004.pt", "state000004.pt"]
    assert {n for n in names if n.endswith(".unreadable")} == {n + checkpoint.UNREADABLE_SUFFIX for n in step_4}
    checkpoint.check_log_dir(str(tmp_path), start_step=2)  # nothing newer in the way


def test_folder_with_no_readable_checkpoint_is_an_error_and_nothing_is_renamed(tmp_path):
    for step in (2, 4):
        checkpoint.save_checkpoint(str(tmp_path), _state(step))
        truncate_file(tmp_path / f"state{step:06d}.pt")
    before = sorted(os.listdir(tmp_path))
    for resolve in (lambda: checkpoint.load_resume_point(str(tmp_path), RATES),
                    lambda: checkpoint.resolve_auto_resume(str(tmp_path))):
        with pytest.raises(checkpoint.UnreadableCheckpointError,
                           match=r"none of its checkpoints can be read \(state000004.pt: .*; state000002.pt: "):
            resolve()
    assert sorted(os.listdir(tmp_path)) == before


def test_reference_style_folder_skips_an_unreadable_newest_model_file(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model000002.pt")
    (tmp_path / "model000004.pt").write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        point = checkpoint.load_resume_point(str(tmp_path), [])
    assert point.step == 2 and "model000004.pt is unreadable (EOFError: no data)" in str(caught[0].message)


def test_checkpoint_another_rank_set_aside_meanwhile_is_skipped_too(tmp_path, monkeypatch):
    for step in (2, 4):
        checkpoint.save_checkpoint(str(tmp_path), _state(step, value=float(step)))
    truncate_file(tmp_path / "state000004.pt")
    listed = checkpoint.complete_steps

    def listed_then_set_aside_by_another_rank(log_dir):
        steps = listed(log_dir)
        for name in os.listdir(log_dir):
            if "000004" in name:
                os.rename(os.path.join(log_dir, name), os.path.join(log_dir, name + checkpoint.UNREADABLE_SUFFIX))
        return steps

    monkeypatch.setattr(checkpoint, "complete_steps", listed_then_set_aside_by_another_rank)
    with pytest.warns(UserWarning, match="state000004.pt is unreadable \\(renamed or removed while it was read\\)"):
        assert checkpoint.newest_readable_checkpoint(str(tmp_path)) == str(tmp_path / "state000002.pt")
