"""What a run says it runs on: the training step's convolution backend and why, the integer
executor's backend, both logged once and kept in the workdir; kernels rebuilt when what
they were built against changes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from f8net_jax import native, ops, train_onednn, writers


def _describe_in_subprocess(env_extra: dict, backend: str = "auto") -> dict:
    code = textwrap.dedent(f"""
        import json
        from f8net_jax import ops
        print(json.dumps(ops.ComputePolicy(backend={backend!r}).describe()))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env_extra),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.xdist_group("smoke_workdir")
def test_training_logs_its_backends_once_and_keeps_them_in_the_workdir(smoke_workdir):
    entries = json.load(open(os.path.join(smoke_workdir, writers.BACKENDS_FILE)))
    train = [e for e in entries if e["command"] == "train"]
    assert len(train) == 1
    expected = ops.ComputePolicy().describe()
    for key in ("conv_backend", "why", "exact_pass", "statistics_pass", "backward"):
        assert train[0][key] == expected[key]
    assert train[0]["jax"] and train[0]["devices"]


def test_auto_names_onednn_when_it_loads():
    ok, _ = train_onednn.status()
    if not ok:
        pytest.skip("oneDNN does not load here")
    described = ops.ComputePolicy().describe()
    assert described["conv_backend"] == "onednn"
    assert "auto" in described["why"] and described["exact_pass"] == "oneDNN float32"


def test_auto_says_why_it_fell_back_to_xla_when_disabled():
    described = _describe_in_subprocess({"F8NET_JAX_NO_ONEDNN": "1"})
    assert described["conv_backend"] == "xla"
    assert described["why"] == "conv_backend 'auto' fell back to XLA: disabled by " \
                               "F8NET_JAX_NO_ONEDNN"
    assert described["exact_pass"] == "XLA, float32 operands"


def test_auto_gives_the_build_errors_last_line_when_the_kernel_does_not_build(tmp_path):
    compiler = tmp_path / "broken-g++"
    compiler.write_text("#!/bin/sh\necho 'In file included from x.cc:1:' >&2\n"
                        "echo 'x.cc:3:10: fatal error: dnnl.hpp: No such file' >&2\n"
                        "echo 'compilation terminated.' >&2\nexit 1\n")
    compiler.chmod(0o755)
    described = _describe_in_subprocess({"CXX": str(compiler),
                                         "F8NET_JAX_CACHE": str(tmp_path / "cache")})
    assert described["conv_backend"] == "xla"
    assert described["why"].startswith("conv_backend 'auto' fell back to XLA: ")
    assert "x.cc:3:10: fatal error: dnnl.hpp: No such file" in described["why"]
    assert "compilation terminated" not in described["why"]


def test_an_explicit_backend_says_it_came_from_the_config():
    assert ops.ComputePolicy(backend="xla").describe()["why"] == "conv_backend 'xla' in the config"


def test_the_kernel_cache_key_covers_the_contents_of_what_it_is_built_against(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("F8NET_JAX_CACHE", str(tmp_path / "cache"))
    source, header, library = tmp_path / "k.cc", tmp_path / "inc" / "k.h", tmp_path / "libk.so"
    header.parent.mkdir()
    source.write_text('#include "k.h"\nextern "C" int k() { return K; }\n')
    header.write_text("#define K 1\n")
    library.write_bytes(b"version 1")
    flags = ["-shared", "-fPIC", "-I", str(header.parent)]

    def build():
        native._contents_digest.cache_clear()
        return native.build(str(source), "k", flags, depends=[str(header.parent), str(library)])

    first = build()
    assert build() == first  # nothing changed: the cached library
    header.write_text("#define K 2\n")  # headers upgraded in place, same paths and flags
    second = build()
    assert second != first
    library.write_bytes(b"version 2")  # the library upgraded in place
    assert build() not in (first, second)


@pytest.mark.xdist_group("smoke_workdir")
def test_integer_commands_log_the_executor_backend(smoke_workdir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "f8net_jax.integer.export_program",
                          f"--workdir={smoke_workdir}", f"--output={tmp_path / 'p'}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    from f8net_jax.integer.executor import choose_backend

    backend, why = choose_backend()
    assert f"export_program: executor here: {backend}; why: {why}" in out.stdout
    entries = json.load(open(os.path.join(smoke_workdir, writers.BACKENDS_FILE)))
    assert entries[-1]["command"] == "export_program"
    assert entries[-1]["executor here"] == backend
