"""A workdir's checkpoints: orbax steps under WORKDIR/checkpoints, each holding the train
state and a SHA-256 digest of its content, checked whenever a checkpoint is read.

A checkpoint that cannot be read or does not match its digest is reported with its step
and the reason. When resuming, the newest checkpoint that verifies is used and the damaged
newer ones are moved to WORKDIR/damaged_checkpoints (never deleted); when none verifies,
the run stops and says so, leaving every file where it is.
"""

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
        with ocp.StandardCheckpointer() as checkpointer:
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


def restore_latest(workdir: str, target: Any = None, move_aside: bool = True):
    """(state, step) of the newest checkpoint of ``workdir`` that verifies, or (None, None)
    when there is none. Damaged newer ones are reported and, with ``move_aside``, moved to
    WORKDIR/damaged_checkpoints by process 0 once a good one is found. Raises
    CheckpointError listing every failure when checkpoints exist and none verifies."""
    available = steps(workdir)
    failures = []
    for step in reversed(available):
        try:
            state = restore(workdir, step, target)
        except CheckpointError as e:
            logging.warning("%s", e)
            failures.append((step, str(e)))
            continue
        if failures and move_aside:
            _move_aside(workdir, [s for s, _ in failures])
        if failures:
            logging.warning("resuming from the checkpoint at step %d instead", step)
        return state, step
    if failures:
        raise CheckpointError(
            "no checkpoint in " + directory(workdir) + " can be used: "
            + "; ".join(reason for _, reason in failures)
            + ". Nothing was moved or deleted: restore the files, or move the folder away "
              "to start again")
    return None, None


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
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:300] + " ..."


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
    num_classes = int(np.asarray(restored["params"]["classifier"]["bias"]).shape[0])
    model = models.create(config.model, num_classes=num_classes,
                          quant=QuantConfig.from_config(config.quant),
                          width_multiplier=config.get("width_multiplier", 1.0))
    variables = {k: restored[k] for k in ("params", "batch_stats", "quant_stats")
                 if k in restored}
    channels = np.asarray(restored["params"]["stem"]["kernel"]).shape[2]
    return model, variables, config, (config.image_size, config.image_size, channels)
