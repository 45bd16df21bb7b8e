"""The `dimcut` command line: one sub-command per concern, each defined by its own module."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from dimcut import __version__

# Each module defines `add_commands(subparsers)`; heavy imports stay inside the command functions
# so that `dimcut --help` is fast.
COMMAND_MODULES = (
    "dimcut.slicing",
    "dimcut.evaluation",
    "dimcut.sweep",
    "dimcut.laws",
    "dimcut.verify",
    "dimcut.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dimcut",
        description=(
            "Shrink an LLM's hidden dimension with SliceGPT (rotate the residual stream by PCA, "
            "delete the low-variance directions), evaluate it, and fit the sparsity laws that "
            "predict what a cut costs."
        ),
    )
    parser.add_argument("--version", action="version", version=f"dimcut {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that concern is not built yet
            raise
        module.add_commands(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path (the engine's temporary output,
    calibration's spill files) runs the same way."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    from dimcut._core import DimcutError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    previous = _install(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"dimcut {args.command}: {what}; no partial output was left behind", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except (DimcutError, ValueError, OSError) as exc:
        # OSError: FileNotFoundError, FileExistsError, PermissionError, disk full, ...
        print(f"dimcut {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        _install(signal.SIGTERM, previous)


def _install(signum, handler):
    """Set a signal handler when we can (only the main thread may); returns the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
