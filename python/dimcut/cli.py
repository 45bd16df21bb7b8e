"""The `dimcut` command line: one sub-command per concern, each defined by its own module."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from dimcut import __version__

# Command -> (the module defining it with `add_commands(subparsers)`, its one-line help: the only
# copy of it; the modules' parsers carry the long description). Only
# the module of the command being run is imported, so `dimcut --help` and `dimcut fit` stay fast
# (no torch).
COMMANDS = {
    "slice": ("dimcut.slicing", "slice a model's hidden dimension (SliceGPT) and write it"),
    "eval": ("dimcut.evaluation", "measure perplexity and zero-shot accuracy of a model"),
    "heal": ("dimcut.healing", "recovery fine-tuning (LoRA, distilled from the dense model)"),
    "sweep": ("dimcut.sweep", "slice at several sparsities and evaluate each point (resumable)"),
    "fit": ("dimcut.laws", "fit the sparsity laws to evaluated models"),
    "predict": ("dimcut.laws", "predict quality at a sparsity, or the sparsity within a budget"),
    "verify": ("dimcut.verify", "check a written checkpoint: headers, manifest, shapes, one layer"),
    "bench": ("dimcut.bench", "benchmark slicing, calibration, the whole slice, inference"),
    "export": ("dimcut.export", "write a plain-format or dense model as GGUF for llama.cpp"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full options of `command` (others are listed by name and help)."""
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
    selected = COMMANDS[command][0] if command in COMMANDS else None
    if selected is not None:
        importlib.import_module(selected).add_commands(subparsers)
    for name, (module, help_text) in COMMANDS.items():
        if module != selected:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path (the engine's temporary output,
    calibration's spill files) runs the same way."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    from dimcut._core import DimcutError

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
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
    except (DimcutError, ValueError, OSError, ModuleNotFoundError) as exc:
        # OSError: FileNotFoundError, FileExistsError, PermissionError, disk full, ...;
        # ModuleNotFoundError: an optional dependency (an extra) is not installed
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
