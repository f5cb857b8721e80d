"""Process-wide XLA settings, made before JAX starts its backend.

XLA:CPU runs the devices of one process (--xla_force_host_platform_device_count=N) as
threads of one pool that meet at every collective, and the same pool runs each device's
intra-op parallel work. A device whose convolution waits for pool threads that are parked at
a collective can then stall the step, and XLA aborts the process when a device is a minute
late. With several devices in the process, each device therefore computes its convolutions
and products on its own thread (the devices are the parallelism), and a late device is
waited for five minutes (after a two-minute warning) before the run is given up. This makes
a stall rare, not impossible: other parallel ops of XLA:CPU still share the pool, and a
fixed-point step on 4 devices and 2 busy cores was seen to stall once; the process then
ends, and a rerun resumes from the last checkpoint.
"""

import os
import re

MULTI_DEVICE_CPU_FLAGS = {
    "xla_cpu_multi_thread_eigen": "false",
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": "120",
    "xla_cpu_collective_call_terminate_timeout_seconds": "300",
}


def forced_cpu_device_count(flags):
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return int(match.group(1)) if match else 1


def configure_cpu_devices(environ=os.environ):
    """Adds MULTI_DEVICE_CPU_FLAGS to XLA_FLAGS when it asks for several CPU devices, keeping
    any of them the user set. Returns the flags it added. Has an effect only before the
    first JAX computation of the process."""
    flags = environ.get("XLA_FLAGS", "")
    if forced_cpu_device_count(flags) < 2:
        return []
    extra = [f"--{name}={value}" for name, value in MULTI_DEVICE_CPU_FLAGS.items()
             if f"--{name}=" not in flags]
    if extra:
        environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return extra


# What a collective says when the process it waits for has died (Gloo on CPU, the
# coordination service elsewhere); JAX raises some of these as ValueError.
_LOST_CONTACT = ("gloo", "connection reset", "connection refused", "coordination",
                 "heartbeat", "barrier", "socket closed", "broken pipe")


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` (or what it came from) is a failed collective."""
    import jax

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, jax.errors.JaxRuntimeError) or any(
                word in str(error).lower() for word in _LOST_CONTACT):
            return True
        error = error.__cause__ or error.__context__
    return False
