"""Every script's command line: each takes --config (checked like its flags), and ends a user error with one line
"<script>: error: ..." (guided_diffusion/cli.py) and no traceback."""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from guided_diffusion.cli import INTERRUPTED_EXIT_CODE, script_main
from guided_diffusion.script_util import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = os.path.join(ROOT, "no_such_dir", "missing.yaml")

# (script, argv with one user error, text the message must hold)
USER_ERRORS = [
    ("scripts/image_train.py", ["--config", MISSING], "missing.yaml"),
    ("scripts/image_sample.py", ["--model_path", MISSING], "missing.yaml"),
    ("scripts/evaluate.py", ["a.npz", "b.npz", "--config", MISSING], "missing.yaml"),
    ("scripts/reconstruct.py", ["--config", MISSING], "missing.yaml"),
    ("scripts/perceptual_distance.py", ["--config", MISSING], "missing.yaml"),
    ("scripts/sweep_schedules.py", ["--config", MISSING], "missing.yaml"),
    ("benchmarks/__main__.py", ["--config", "no_such_benchmark"], "no_such_benchmark"),
    ("scripts/plot_training.py", ["--runs", MISSING, "--out_dir", "unused"], "missing.yaml"),
    ("scripts/plot_weights.py", ["--out_dir", "unused", "--schedules", "quadratic"], "quadratic"),
    ("datasets/prepare.py", ["--source", MISSING, "--dest", "unused"], "missing.yaml"),
]


def load_script(relative_path):
    if relative_path.endswith("__main__.py"):   # a package run with python -m: its relative imports need its name
        return importlib.import_module(os.path.dirname(relative_path) + ".__main__")
    name = os.path.splitext(os.path.basename(relative_path))[0] + "_under_test"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv, named", USER_ERRORS, ids=[s for s, _, _ in USER_ERRORS])
def test_user_error_in_each_script_is_one_line_naming_the_script(script, argv, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # nothing a script might write lands in the repository
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(argv)
    message = exit_info.value.code   # Python prints it on stderr and exits with code 1
    assert isinstance(message, str) and "\n" not in message.strip()
    name = os.path.basename(os.path.dirname(script) if script.endswith("__main__.py") else script)
    assert message.startswith(f"{name}: error: ") and named in message


@pytest.mark.parametrize("script, argv", [("scripts/image_sample.py", ["--model_path", MISSING]),
                                          ("datasets/prepare.py", ["--source", MISSING, "--dest", "out"])])
def test_user_error_from_the_command_line_exits_non_zero_with_one_stderr_line(script, argv, tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120, env=dict(os.environ))
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{os.path.basename(script)}: error: "), completed.stderr
    assert "Traceback" not in completed.stderr


def test_bugs_raise_and_ctrl_c_exits_130_with_the_resume_hint(capsys):
    @script_main(interrupted="rerun to resume")
    def interrupted():
        raise KeyboardInterrupt

    @script_main()
    def buggy():
        raise TypeError("a bug")

    with pytest.raises(SystemExit) as exit_info:
        interrupted()
    assert exit_info.value.code == INTERRUPTED_EXIT_CODE
    assert capsys.readouterr().err.strip() == "test_cli.py: interrupted; rerun to resume"
    with pytest.raises(TypeError, match="a bug"):
        buggy()


# (script, a flag of that script and a YAML value, the value it parses to, positional arguments)
CONFIG_VALUES = [
    ("scripts/image_train.py", "lr", 0.5, 0.5, []),
    ("scripts/image_sample.py", "num_samples", 3, 3, []),
    ("scripts/evaluate.py", "metrics", "fid", "fid", ["a.npz", "b.npz"]),
    ("scripts/reconstruct.py", "snrs", "1,10", "1,10", []),
    ("scripts/perceptual_distance.py", "num_triplets", 3, 3, []),
    ("scripts/sweep_schedules.py", "schedules", [10, "5,5"], ["10", "5,5"], []),
]


@pytest.mark.parametrize("script, key, value, parsed, positionals", CONFIG_VALUES, ids=[c[0] for c in CONFIG_VALUES])
def test_every_script_takes_a_config_checked_like_its_flags(script, key, value, parsed, positionals, tmp_path):
    module = load_script(script)
    parse = (lambda argv: parse_args(module.create_argparser(), argv)) if script.endswith("evaluate.py") else \
        module.parse_args
    config = tmp_path / "flags.yaml"
    config.write_text(yaml.safe_dump({key: value}))
    assert getattr(parse([*positionals, "--config", str(config)]), key) == parsed
    config.write_text(yaml.safe_dump({key: value, "no_such_flag": 1}))
    with pytest.raises(ValueError, match="unknown key\\(s\\) no_such_flag"):
        parse([*positionals, "--config", str(config)])
