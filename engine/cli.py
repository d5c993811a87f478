"""The `prefix-serve` command: `serve`, `train`, `eval` and `bench` subcommands.

Each subcommand lives in its own module, which provides `add_parser(subparsers)`; the parser's `func` default
runs it. Modules are imported lazily so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = {
    "serve": "engine.server",
    "train": "engine.train",
    "eval": "engine.evaluate",
    "bench": "benchmarks.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-serve",
                                     description="Serve many PEFT prefix-tuned tasks on one frozen LLM.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
