"""Runs ``python -m f8net_jax.main ARGS`` in a process whose reads of one checkpoint fail,
as a flaky network mount would fail on one host only:

    python tests/scripts/unreadable_checkpoint.py STEP ARGS...

The files stay intact (the other processes read them); only this process's restore of
checkpoint STEP raises the error a damaged checkpoint raises."""

import runpy
import sys

from f8net_jax import checkpoints

step, sys.argv = int(sys.argv[1]), ["f8net_jax.main"] + sys.argv[2:]
_restore = checkpoints.restore


def restore(workdir, at, target=None):
    if at == step:
        raise checkpoints.CheckpointError(f"checkpoint at step {at} cannot be read: "
                                          f"input/output error (this host's mount)")
    return _restore(workdir, at, target)


checkpoints.restore = restore
runpy.run_module("f8net_jax.main", run_name="__main__")
