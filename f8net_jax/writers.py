"""Metric writers and progress reports for the training loop.

With TensorFlow installed, clu's writers (TensorBoard events and a console line) and
clu's ReportProgress. clu's writer package imports TensorFlow, so where it is absent (a GPU
image without it) the loop falls back to console lines plus a JSON-lines file
``metrics.jsonl`` in the workdir, and a progress report of its own: same calls, no
TensorFlow.
"""

import importlib.util
import json
import os
import sys
import time
from typing import Any, Mapping, Optional

from absl import logging


def tensorflow_available() -> bool:
    if "tensorflow" in sys.modules:  # None there means an import was blocked
        return sys.modules["tensorflow"] is not None
    return importlib.util.find_spec("tensorflow") is not None


class JsonLinesWriter:
    """The part of clu's MetricWriter interface the loop uses, without TensorFlow."""

    def __init__(self, workdir: Optional[str]):
        self._path = os.path.join(workdir, "metrics.jsonl") if workdir else None

    def _append(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        logging.info("[%d] %s", step, ", ".join(f"{k}={v}" for k, v in values.items()))
        if self._path:
            with open(self._path, "a") as f:
                f.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._append(step, "scalars", {k: float(v) for k, v in scalars.items()})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._append(step, "texts", dict(texts))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """Steps per second and an ETA, every ``every_secs`` (clu's ReportProgress, reduced)."""

    def __init__(self, num_train_steps: int, writer, every_secs: float = 60.0):
        self._total, self._writer, self._every = num_train_steps, writer, every_secs
        self._last_time, self._last_step = None, None

    def __call__(self, step: int) -> None:
        now = time.time()
        if self._last_time is None:
            self._last_time, self._last_step = now, step
            return
        if now - self._last_time < self._every and step < self._total:
            return
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        eta = (self._total - step) / rate if rate > 0 else float("nan")
        logging.info("%.1f steps/s, %.1f%% (%d/%d), ETA: %.0f s", rate, 100 * step / self._total,
                     step, self._total, eta)
        self._writer.write_scalars(step, {"steps_per_sec": rate})
        self._last_time, self._last_step = now, step


def create(workdir: str, *, is_chief: bool, num_train_steps: int):
    """(writer for everything, writer for TensorBoard only, progress report)."""
    if not tensorflow_available():
        writer = JsonLinesWriter(workdir if is_chief else None)
        return writer, writer, Progress(num_train_steps, writer)
    from clu import metric_writers, periodic_actions

    tensorboard = (metric_writers.SummaryWriter(workdir) if is_chief
                   else metric_writers.MultiWriter([]))
    writer = metric_writers.MultiWriter([tensorboard, metric_writers.LoggingWriter()])
    return writer, tensorboard, periodic_actions.ReportProgress(
        num_train_steps=num_train_steps, writer=writer)


BACKENDS_FILE = "backends.json"


def record_backends(workdir: str, command: str, what: Mapping[str, Any]) -> str:
    """Logs what computes a command's work (one line) and appends it, with the JAX version
    and devices, to WORKDIR/backends.json (one entry per start); returns the line."""
    import jax

    line = f"{command}: " + "; ".join(f"{key}: {value}" for key, value in what.items())
    logging.info("%s", line)
    if jax.process_index() == 0 and os.path.isdir(workdir):
        path = os.path.join(workdir, BACKENDS_FILE)
        entries = json.load(open(path)) if os.path.exists(path) else []
        entries.append({"command": command, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "jax": jax.__version__, "devices": str(jax.devices()[0].device_kind),
                        **what})
        with open(path + ".partial", "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(path + ".partial", path)
    return line
