"""The README's code example runs, each value its comments state is what it returns, and
every command it shows is accepted by the program it calls."""

import ast
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_values_are_what_the_code_returns():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    checked = 0
    for block in blocks:
        namespace = {}
        lines = block.splitlines()
        for statement in ast.parse(block).body:
            # A one-line statement's comment is the value it must give; a longer one (a
            # class, a call over several lines) is run as it is.
            source = "\n".join(lines[statement.lineno - 1:statement.end_lineno])
            if statement.end_lineno != statement.lineno:
                exec(compile(ast.Module([statement], []), "README", "exec"), namespace)
                continue
            line = source
            code, _, comment = line.partition("  #")
            tree = ast.parse(code.strip())
            if isinstance(tree.body[0], ast.Expr) and comment.strip():
                value = eval(compile(ast.Expression(tree.body[0].value), "README", "eval"), namespace)
                expected = ast.literal_eval(comment.split("=")[-1].strip())
                np.testing.assert_array_equal(np.asarray(value), expected, err_msg=line)
                checked += 1
            else:
                exec(compile(tree, "README", "exec"), namespace)
                target = comment.strip()
                if target and isinstance(tree.body[0], ast.Assign):
                    name = tree.body[0].targets[0].id
                    np.testing.assert_array_equal(np.asarray(namespace[name]),
                                                  ast.literal_eval(target), err_msg=line)
                    checked += 1
    assert checked >= 3


SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"
ROOT = README.parent


def readme_commands() -> list:
    """Every `python ...` and `make ...` command the README shows: the lines of its bash
    blocks (continuations joined, comments dropped, chains split at && and ;, a command
    inside a quoted --command="..." included) and its inline code spans."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for inner in re.findall(r'--command="([^"]*)"', line) or [line]:
                commands += [c.strip() for c in re.split(r"&&|;", inner)]
    commands += re.findall(r"`((?:python|make) [^`]+)`", text)
    keep = []
    for c in commands:
        c = re.sub(r"^(PYTHON=\S+\s+)", "", c)
        c = re.sub(r"^\S*python3?(\.\d+)?\s", "python ", c)  # .venv/bin/python, python3.12
        if c.startswith(("python ", "make ")) and c not in keep:
            keep.append(c)
    return keep


def test_the_readme_shows_the_commands_it_is_about():
    commands = readme_commands()
    for expected in ("make demo", "make test", "python -m f8net_jax.main",
                     "python -m f8net_jax.integer.export_program", "python benchmarks/"):
        assert any(c.startswith(expected) for c in commands), expected


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_accepted_by_the_program_it_calls(command, tmp_path):
    if command.startswith("make "):
        target = command.split()[1]
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), command
        return
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    for var in set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", command)) - {"PATH"}:
        env[var] = str(tmp_path / var.lower())  # a placeholder path for each variable
    argv = re.sub(r"\[(--[^\]]+)\]", r"\1", command.split(maxsplit=1)[1])  # [--x]: try it
    if argv.startswith("-c "):  # inline code: it must compile
        compile(shlex.split(argv)[1], command, "exec")
        return
    if argv.startswith("-m ") and len(argv.split()) == 2:  # a module named in the text
        assert importlib.util.find_spec(argv.split()[1]) is not None, command
        return
    result = subprocess.run(["bash", "-c", f"exec python {SCRIPTS / 'parse_only.py'} {argv}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stdout[-1500:]}{result.stderr[-1500:]}"
