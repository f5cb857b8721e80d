"""Trains and evaluates a model of this package.

    python -m f8net_jax.main --config=configs/smoke.py --workdir=/tmp/f8net_smoke \
        [--config.batch_size=64 ...]

Rerunning the same command resumes from the workdir's latest checkpoint. On several hosts,
pass --coordinator_address, --num_processes and --process_id (or --distributed on
platforms where jax.distributed.initialize() finds them itself).
"""

import logging as python_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and formats.")
config_flags.DEFINE_config_file("config", None, "Training configuration (configs/*.py).",
                                lock_config=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's flag parsing, with a one-line error for a --config.<field> that does not exist
    or a value of the wrong type."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        # A config file that raised carries its traceback in the message: keep the first
        # line (which flag, which file) and the last (the error).
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        sys.exit("f8net_jax: " + (f"{lines[0]} {lines[-1]}" if len(lines) > 1 else str(e)))
    except SyntaxError as e:
        sys.exit(f"f8net_jax: config file {e.filename!r} cannot be loaded: syntax error at "
                 f"line {e.lineno}: {e.msg}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        from f8net_jax import defaults as default

        reference = default.get_config()
        for arg in argv[1:]:
            if arg.startswith("--config."):
                path = arg[len("--config."):].split("=", 1)[0]
                node = reference
                for part in path.split("."):
                    if not hasattr(node, "keys") or part not in node:
                        sys.exit(f"f8net_jax: config field {path!r} does not exist: see the "
                                 f"fields of f8net_jax/defaults.py")
                    node = node[part]
        sys.exit(f"f8net_jax: bad --config value: {e}")


def load_config():
    """FLAGS.config (its file is read here, on first access), or one line naming the file
    and what is wrong with it."""
    path = FLAGS["config"].config_filename if hasattr(FLAGS["config"], "config_filename") \
        else "--config"
    try:
        config = FLAGS.config
        config.keys()  # a file that failed to load raises only when the config is used
        return config
    except Exception as e:  # the config file is user code: any error is its error
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = (str(cause).strip().splitlines()[-1].strip() if str(cause).strip()
                  else type(cause).__name__)
        if isinstance(cause, SyntaxError):
            reason = f"syntax error at line {cause.lineno}: {cause.msg}"
        sys.exit(f"f8net_jax: config file {path!r} cannot be loaded: {reason}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = load_config()
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        sys.exit(f"f8net_jax: --workdir {FLAGS.workdir!r} is a file, not a folder")
    # Orbax reports every checkpoint step at INFO; keep the console to our own lines.
    logging.get_absl_logger().addFilter(
        lambda record: "/orbax/" not in record.pathname or record.levelno >= python_logging.WARNING)
    from f8net_jax import runtime

    runtime.configure_cpu_devices()
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    from f8net_jax import checkpoints, train

    logging.info("JAX process %d of %d, local devices %s", jax.process_index(),
                 jax.process_count(), jax.local_devices())
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except Exception as e:
        if not (jax.process_count() > 1 and runtime.lost_contact(e)):
            if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError,
                              FloatingPointError)):
                sys.exit(f"f8net_jax: {e}")
            raise
        # A collective failed: another process has died. Say so and leave at once; the
        # usual exit would wait for that process at JAX's shutdown barrier, then abort.
        done = checkpoints.steps(FLAGS.workdir)
        kept = (f"the last checkpoint (step {done[-1]})" if done else "the start (no "
                "checkpoint was written)")
        reason = " ".join(str(e).split())[:400]
        print(f"f8net_jax: process {jax.process_index()} of {jax.process_count()} lost "
              f"contact with another process ({reason}); rerun every process to resume "
              f"from {kept}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
