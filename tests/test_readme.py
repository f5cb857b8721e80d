"""The README's code example runs, and each value its comments state is what it returns."""

import ast
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_values_are_what_the_code_returns():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    checked = 0
    for block in blocks:
        namespace = {}
        for line in block.splitlines():
            code, _, comment = line.partition("  #")
            if not code.strip():
                continue
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
