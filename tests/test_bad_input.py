"""Bad input fails at once with one line that names the culprit, before anything compiles
and without leaving anything behind."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from configs import smoke
from f8net_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", -32, "config.batch_size must be >= 1, got -32"),
    ("batch_size", 0, "config.batch_size must be >= 1, got 0"),
    ("log_every_steps", 0, "config.log_every_steps must be >= 1"),
    ("checkpoint_every_steps", -1, "config.checkpoint_every_steps must be >= 0"),
    ("eval_every_epochs", 0, "config.eval_every_epochs must be >= 1"),
    ("eval_batches", 0, "config.eval_batches must be -1 .* or >= 1"),
    ("max_checkpoints", 0, "config.max_checkpoints must be >= 1"),
    ("learning_rate", -0.1, "config.learning_rate must be >= 0"),
    ("learning_rate", float("nan"), "config.learning_rate must be >= 0, got nan"),
    ("momentum", 1.0, r"config.momentum must be in \[0, 1\)"),
    ("weight_decay", -1e-4, "config.weight_decay must be >= 0"),
    ("image_size", 0, "config.image_size must be >= 1"),
    ("num_train_steps", 0, "config.num_train_steps must be -1 .* or >= 1"),
    ("seed", -1, "config.seed must be >= 0"),
    ("train_examples", 0, "config.train_examples must be -1 .* or >= 1"),
    ("width_multiplier", 0.0, "config.width_multiplier must be > 0"),
])
def test_out_of_range_config_fields_are_refused_naming_the_field(field, value, match):
    config = smoke.get_config()
    config[field] = value
    with pytest.raises(ValueError, match=match):
        train.check_config(config)


def run_main(*args, timeout=120):
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "f8net_jax.main", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return out, time.time() - start


def last_line(out):
    return out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("override, match", [
    ("--config.batch_size=-32", "config.batch_size must be >= 1, got -32"),
    ("--config.log_every_steps=0", "config.log_every_steps must be >= 1, got 0"),
    ("--config.max_checkpoints=0", "config.max_checkpoints must be >= 1"),
])
def test_the_command_refuses_bad_fields_in_one_line_without_training(tmp_path, override, match):
    workdir = tmp_path / "run"
    out, seconds = run_main("--config=configs/smoke.py", f"--workdir={workdir}", override)
    assert out.returncode != 0 and match in last_line(out), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (workdir / "checkpoints").exists()
    assert seconds < 60  # no compile, no data


def test_missing_unparsable_and_badly_typed_config_files_give_one_line(tmp_path):
    bad_syntax = tmp_path / "bad_syntax.py"
    bad_syntax.write_text("def get_config(:\n")
    bad_type = tmp_path / "bad_type.py"
    bad_type.write_text("from configs import default\n\ndef get_config():\n"
                        "    c = default.get_config()\n    c.batch_size = '32'\n    return c\n")
    cases = [(tmp_path / "missing.py", "missing.py' cannot be loaded: [Errno 2] No such file"),
             (bad_syntax, "bad_syntax.py' cannot be loaded: syntax error at line 1"),
             (bad_type, "Could not override field 'batch_size'")]
    for path, match in cases:
        out, _ = run_main(f"--config={path}", f"--workdir={tmp_path / 'run'}")
        assert out.returncode != 0 and match in last_line(out), out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    out, _ = run_main("--config=configs/smoke.py", f"--workdir={path}")
    assert out.returncode != 0
    assert f"--workdir '{path}' is a file, not a folder" in last_line(out)
    assert path.read_text() == "mine"


def test_a_rerun_must_keep_the_fields_that_define_the_run(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = smoke.get_config()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    saved = (workdir / "config.json").read_text()
    changed = smoke.get_config()
    changed.image_size, changed.model, changed.quant.mode = 20, "resnet56", "float"
    with pytest.raises(ValueError) as error:
        train.check_same_run(changed, str(workdir))
    message = str(error.value)
    for part in ("image_size: 16 -> 20", "model: 'resnet20' -> 'resnet56'",
                 "quant.mode: 'fixed' -> 'float'"):
        assert part in message
    # Fields that only change how long or how it trains may change.
    longer = smoke.get_config()
    longer.num_train_steps, longer.learning_rate, longer.quant.conv_backend = 24, 0.01, "xla"
    train.check_same_run(longer, str(workdir))
    assert (workdir / "config.json").read_text() == saved


def test_the_command_refuses_a_rerun_with_another_model(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(smoke.get_config().to_json_best_effort(indent=1))
    out, seconds = run_main("--config=configs/smoke.py", f"--workdir={workdir}",
                            "--config.model=resnet56", "--config.image_size=20")
    assert out.returncode != 0 and "holds a run of another configuration" in last_line(out)
    assert "image_size: 16 -> 20" in last_line(out) and "Traceback" not in out.stderr
    assert not (workdir / "checkpoints").exists() and seconds < 60
