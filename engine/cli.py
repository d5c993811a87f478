"""The `prefix-serve` command: `serve`, `demo`, `train`, `eval` and `bench` subcommands.

Each subcommand lives in its own module, which provides `add_parser(subparsers)`; the parser's `func` default
runs it. Only the chosen subcommand's module is imported, so `--help` is fast and one subcommand's optional
dependencies never break another.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import socket
import sys

_SUBCOMMANDS = {
    "serve": ("engine.serving.server", "run the OpenAI-compatible HTTP server"),
    "demo": ("engine.training.demo", "show the same prompts with and without each demo prefix"),
    "train": ("engine.training.train", "train a PEFT prefix-tuning adapter on JSONL data"),
    "eval": ("engine.training.evaluate", "score a prefix against the base model on held-out data"),
    "bench": ("benchmarks.bench", "run the benchmarks (baselines and ours in one run)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-serve",
                                     description="Serve many PEFT prefix-tuned tasks on one frozen LLM.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        if name == command:
            importlib.import_module(module_name).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def check_port_free(host: str, port: int) -> None:
    """Exit with one line if `serve` could not listen on host:port. The server binds only once its engine has
    loaded, which can take minutes, so a port in use is found by a bind test first (with the same socket options
    as the server's, so a port in TIME_WAIT still counts as free)."""
    if port == 0:  # the server picks a free port
        return
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is already in use; stop the process that holds it or pick another --port"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need privileges); pick another --port"
        else:  # create_server appends the address it tried, which the line below already names
            reason = f"{str(exc.strerror or exc).split(' (while attempting')[0]}; check --host and --port"
        raise SystemExit(f"prefix-serve serve: cannot listen on {host}:{port}: {reason}.") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in _SUBCOMMANDS else None).parse_args(argv)
    if args.command == "serve":
        check_port_free(args.host, args.port)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
