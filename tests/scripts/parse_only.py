"""Runs a command's argument parsing and stops: ``parse_only.py -m MODULE ARGS`` or
``parse_only.py SCRIPT.py ARGS``. Exit 0 when the program accepts the arguments (argparse
or absl flags, and for ml_collections config flags the config file and its overrides),
its own error and a non-zero exit otherwise. Nothing else of the program runs."""

import argparse
import os
import runpy
import sys

from absl import app, flags


class Parsed(Exception):
    pass


def _parse_args(self, args=None, namespace=None):
    _original_parse_args(self, args, namespace)
    raise Parsed


def _app_run(main, argv=None, flags_parser=None):
    argv = sys.argv if argv is None else argv
    (flags_parser or flags.FLAGS)(argv)
    for name, flag in flags.FLAGS.__flags.items():  # config files load on first access
        if hasattr(flag, "config_filename"):
            getattr(flags.FLAGS, name).keys()
    raise Parsed


_original_parse_args = argparse.ArgumentParser.parse_args
argparse.ArgumentParser.parse_args = _parse_args
app.run = _app_run

if __name__ == "__main__":
    module = sys.argv[1] == "-m"
    target = sys.argv[2] if module else sys.argv[1]
    sys.argv = [target] + sys.argv[3 if module else 2:]
    # sys.path[0] as `python -m MODULE` (the current folder) or `python SCRIPT` would set it
    sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(target))
    try:
        (runpy.run_module if module else runpy.run_path)(target, run_name="__main__")
    except Parsed:
        sys.exit(0)
    sys.exit(f"{target}: ran to the end without parsing its arguments")
