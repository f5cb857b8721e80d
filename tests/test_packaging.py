"""The package as a user installs it: a wheel built from the tracked files, installed
outside the checkout, holds every kernel source and the configs (not as a top-level
package), and trains, exports and verifies from there."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tracked_tree(target: pathlib.Path) -> None:
    """The checkout's tracked (and new, not ignored) files, as they are now: a clean clone
    of the working tree, without build outputs or the virtual environment."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if not os.path.lexists(source):
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target / name)
        else:
            shutil.copy2(source, target / name)


def _run(command, cwd, env, timeout=900):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_the_wheel_installed_outside_the_checkout_trains_exports_and_verifies(tmp_path):
    source, dist, site, run = (tmp_path / d for d in ("source", "dist", "site", "run"))
    for d in (source, run):
        d.mkdir()
    _tracked_tree(source)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "-q", "-w", str(dist), str(source)], cwd=tmp_path, env=os.environ)
    (wheel,) = dist.glob("f8net_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for kernel in ("f8net_jax/kernels/train_onednn.cc", "f8net_jax/integer/kernels/int8_onednn.cc",
                   "f8net_jax/integer/kernels/conv_u8s8.cc", "f8net_jax/configs/smoke.py"):
        assert kernel in names, kernel
    assert {n.split("/")[0] for n in names} == {"f8net_jax", wheel.name.split("-py3")[0]
                                                 + ".dist-info"}, "a second top-level package"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
          str(wheel)], cwd=tmp_path, env=os.environ)

    # The installed copy, not the checkout: its kernels built from its own sources.
    env = dict(os.environ, PYTHONPATH=str(site), F8NET_JAX_CACHE=str(tmp_path / "cache"))
    where = _run([sys.executable, "-c", "import f8net_jax, f8net_jax.configs as c; "
                  "print(f8net_jax.__file__); print(c.DIRECTORY)"], cwd=run, env=env).split()
    assert all(path.startswith(str(site)) for path in where[:2]), where
    configs = _run([sys.executable, "-m", "f8net_jax.configs"], cwd=run, env=env).strip()
    assert configs == str(site / "f8net_jax" / "configs")
    workdir = str(run / "smoke")
    out = _run([sys.executable, "-m", "f8net_jax.main", f"--config={configs}/smoke.py",
                f"--workdir={workdir}"], cwd=run, env=env)
    assert "train: conv_backend: onednn" in out or "fell back to XLA" in out, out[-2000:]
    assert list((tmp_path / "cache").glob("train_onednn-*.so")) or "fell back to XLA" in out
    out = _run([sys.executable, "-m", "f8net_jax.integer.export_program",
                f"--workdir={workdir}", f"--output={run / 'smoke_int8'}", "--onnx"],
               cwd=run, env=env)
    assert (run / "smoke_int8.json").exists() and (run / "smoke_int8.onnx").exists(), out
    out = _run([sys.executable, "-m", "f8net_jax.integer.verify_program",
                f"--workdir={workdir}", f"--program={run / 'smoke_int8'}", "--num_images=64"],
               cwd=run, env=env)
    assert "max |logit diff| 0 " in out, out[-2000:]
    assert "verify_program: executor:" in out, out[-2000:]
