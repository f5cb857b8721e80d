"""A workdir's checkpoints: orbax steps under WORKDIR/checkpoints, each holding the train
state and a SHA-256 digest of its content, checked whenever a checkpoint is read.

A checkpoint that cannot be read or does not match its digest is reported with its step
and the reason. When resuming, the newest checkpoint that verifies (on several processes:
that every process verifies) is used and the damaged newer ones are moved to
WORKDIR/damaged_checkpoints (never deleted); when none verifies, the run stops and says
so, leaving every file where it is.
"""

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

STATE, DIGEST = "state", "digest"
DIGEST_FILE = "metadata"  # where orbax's JsonSave puts an item
LEGACY = "default"  # the single item of checkpoints written before digests
DAMAGED = "damaged_checkpoints"


class CheckpointError(ValueError):
    """No checkpoint of a workdir can be used."""


def directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def digest(tree: Any) -> str:
    """SHA-256 over every leaf of ``tree``: its path, dtype, shape and bytes. A path is the
    names of its keys, so a TrainState and the nested dicts it is restored into without a
    target hash alike; integers are hashed as int64, so the step (an int32 array when
    saved, restored as int64 into a fresh state's Python int) does too."""
    h = hashlib.sha256()
    leaves = sorted(((_path(path), leaf) for path, leaf in
                     jax.tree_util.tree_flatten_with_path(tree)[0]), key=lambda t: t[0])
    for path, leaf in leaves:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
            a = a.astype(np.int64)
        a = np.ascontiguousarray(a)
        h.update(json.dumps([path, a.dtype.str, a.shape]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _path(path) -> str:
    names = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def manager(workdir: str, max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))


def save(mngr: ocp.CheckpointManager, step: int, host_state: Any) -> None:
    """Writes ``host_state`` (host arrays) with its digest, atomically, and waits."""
    mngr.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(host_state),
        DIGEST: ocp.args.JsonSave({"sha256": digest(host_state), "step": int(step)})}))
    mngr.wait_until_finished()


def steps(workdir: str) -> list:
    """The finished checkpoints' steps, read from the folder names (no orbax manager: on
    several hosts every process must make the same orbax calls, and whether the folder
    exists yet at the first start differs between them)."""
    root = directory(workdir)
    if not os.path.isdir(root):
        return []
    return sorted(int(name) for name in os.listdir(root)
                  if name.isdigit() and os.path.isdir(os.path.join(root, name)))


def restore(workdir: str, step: int, target: Any = None) -> Any:
    """The state of checkpoint ``step``, restored into the structure of ``target`` (None:
    nested dicts), after checking its digest; raises CheckpointError saying why not."""
    step_dir = os.path.join(directory(workdir), str(step))
    legacy = os.path.isdir(os.path.join(step_dir, LEGACY)) and not os.path.isdir(
        os.path.join(step_dir, STATE))
    try:
        with _draining_event_loops(), _local_checkpointer() as checkpointer:
            state = checkpointer.restore(os.path.join(step_dir, LEGACY if legacy else STATE),
                                         target)
        if not legacy:
            with open(os.path.join(step_dir, DIGEST, DIGEST_FILE)) as f:
                saved = json.load(f)
    except Exception as e:  # the files are data: any failure to read them is their fault
        raise CheckpointError(f"checkpoint at step {step} ({step_dir}) cannot be read: "
                              f"{_reason(e)}") from e
    if legacy:
        logging.warning("checkpoint at step %d (%s) was written without a digest: not "
                        "verified", step, step_dir)
        return state
    if not isinstance(saved, dict) or "sha256" not in saved:
        raise CheckpointError(f"checkpoint at step {step} ({step_dir}) has no digest")
    if digest(state) != saved["sha256"]:
        raise CheckpointError(f"checkpoint at step {step} ({step_dir}) does not match its "
                              f"digest: its files were changed or damaged after writing")
    return state


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: orbax ends a restore at a barrier of every
    process, which one whose read failed, or that reads another step, never reaches."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def restore_latest(workdir: str, target: Any = None, move_aside: bool = True):
    """(state, step) of the newest checkpoint of ``workdir`` that verifies, or (None, None)
    when there is none. Damaged newer ones are reported and, with ``move_aside``, moved to
    WORKDIR/damaged_checkpoints by process 0 once a good one is found. Raises
    CheckpointError listing every failure when checkpoints exist and none verifies.

    On several processes every one verifies the checkpoints itself (a read can fail on
    one host only), and all resume from the newest step that every one of them verified."""
    available = steps(workdir)
    failures = []  # (step, reason) of the checkpoints this process could not use
    state, step = _newest_verified(workdir, available, target, None, failures)
    if jax.process_count() > 1:
        return _agree(workdir, available, target, state, step, failures, move_aside)
    if step is None:
        if failures:
            raise _none_usable(workdir, [reason for _, reason in failures])
        return None, None
    if failures and move_aside:
        _move_aside(workdir, [s for s, _ in failures])
    if failures:
        logging.warning("resuming from the checkpoint at step %d instead", step)
    return state, step


def _newest_verified(workdir: str, available: list, target: Any, bound: Optional[int],
                     failures: list):
    """(state, step) of the newest of ``available`` up to ``bound`` (None: any) that
    verifies, or (None, None); those that do not are logged and added to ``failures``."""
    for step in reversed(available):
        if bound is not None and step > bound:
            continue
        try:
            return restore(workdir, step, target), step
        except CheckpointError as e:
            logging.warning("%s", e)
            failures.append((step, str(e)))
    return None, None


def _agree(workdir: str, available: list, target: Any, state: Any, step: Optional[int],
           failures: list, move_aside: bool):
    """restore_latest on several processes. Each round all-gathers every process's newest
    verified step (-1: none) and newest step on disk; a process whose step is newer than
    the oldest named looks again at or before that one, until all name the same step.
    Every process makes the same collectives whatever failed where, and all take the same
    branches after them."""
    from jax.experimental import multihost_utils

    on_disk = available[-1] if available else -1
    first = None
    while True:
        mine = np.array([-1 if step is None else step, on_disk], np.int32)
        rows = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 2)
        first = rows if first is None else first
        agreed, newest = int(rows[:, 0].min()), int(rows[:, 1].max())
        if agreed < 0 or (rows[:, 0] == agreed).all():
            break
        if step > agreed:
            state, step = _newest_verified(workdir, available, target, agreed, failures)
    if newest < 0:
        return None, None
    if agreed < 0:
        behind = _processes(rows[:, 0] < 0)
        raise _none_usable(workdir, [reason for _, reason in failures]
                           + [f"process(es) {behind} found none that verifies"])
    if newest > agreed and move_aside:
        _move_aside(workdir, [s for s in reversed(available) if s > agreed])
    if newest > agreed:
        logging.warning("resuming from the checkpoint at step %d instead, the newest that "
                        "all %d processes verified (process(es) %s could not use a newer "
                        "one)", agreed, len(rows), _processes(first[:, 0] < newest))
    return state, step


def _processes(mask) -> str:
    return ", ".join(str(p) for p in np.flatnonzero(mask))


def _none_usable(workdir: str, reasons: list) -> CheckpointError:
    return CheckpointError(
        "no checkpoint in " + directory(workdir) + " can be used: " + "; ".join(reasons)
        + ". Nothing was moved or deleted: restore the files, or move the folder away "
          "to start again")


def _move_aside(workdir: str, bad_steps: list) -> None:
    _sync("f8net_jax: checkpoints verified")  # nobody reads what process 0 moves
    if jax.process_index() == 0:
        target_root = os.path.join(workdir, DAMAGED)
        os.makedirs(target_root, exist_ok=True)
        for step in bad_steps:
            target, n = os.path.join(target_root, str(step)), 1
            while os.path.exists(target):
                target, n = os.path.join(target_root, f"{step}.{n}"), n + 1
            shutil.move(os.path.join(directory(workdir), str(step)), target)
            logging.warning("moved the checkpoint at step %d to %s", step, target)
    _sync("f8net_jax: damaged checkpoints moved")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _reason(e: Exception) -> str:
    """One short line: the root cause's message (orbax wraps a read error in a message
    that spells out the whole TensorStore spec)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:300] + " ..."


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that lets every task it still holds finish before it closes.

    Orbax runs a restore in a fresh loop and closes it as soon as the first read fails.
    The other reads go on in TensorStore's threads and, done, call back into the closed
    loop: each prints a 'RuntimeError: Event loop is closed' traceback, and each task
    left with an error logs 'Task exception was never retrieved' when collected. Waiting
    for them (their errors gathered, not raised) leaves nothing behind."""

    def close(self) -> None:
        while not self.is_running() and not self.is_closed() and asyncio.all_tasks(self):
            self.run_until_complete(
                asyncio.gather(*asyncio.all_tasks(self), return_exceptions=True))
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingLoop()


@contextlib.contextmanager
def _draining_event_loops():
    """Event loops created meanwhile (orbax's, in any thread) drain before closing."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def load_workdir(workdir: str, step: Optional[int] = None):
    """(model, variables, config, image_shape) of a training workdir's newest verified (or
    given) checkpoint: the model rebuilt from its config.json, for evaluation."""
    import ml_collections

    from f8net_jax import models
    from f8net_jax.quant_config import QuantConfig

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no config.json: not a training workdir")
    config = ml_collections.ConfigDict(json.load(open(path)))
    if step is None:
        restored, step = restore_latest(workdir, move_aside=False)
        if restored is None:
            raise FileNotFoundError(f"{workdir} holds no checkpoint")
    else:
        restored = restore(workdir, step)
    variables = {k: restored[k] for k in ("params", "batch_stats", "quant_stats")
                 if k in restored}
    quant = QuantConfig.from_config(config.quant)
    if models.is_user_model(config.model):
        from f8net_jax.models import user
        model, _, channels = user.rebuild(
            config.model, restored["params"], quant=quant, image_size=config.image_size,
            num_classes=config.get("num_classes", 10), channels=config.get("channels", 3))
        return model, variables, config, (config.image_size, config.image_size, channels)
    num_classes = int(np.asarray(restored["params"]["classifier"]["bias"]).shape[0])
    model = models.create(config.model, num_classes=num_classes, quant=quant,
                          width_multiplier=config.get("width_multiplier", 1.0))
    channels = np.asarray(restored["params"]["stem"]["kernel"]).shape[2]
    return model, variables, config, (config.image_size, config.image_size, channels)
