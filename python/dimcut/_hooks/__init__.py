"""Test hooks for interruption and fault tests, armed only when the process was started through
the test entry point `python -m dimcut._hooks <dimcut arguments>` (never by `dimcut` itself, so
a stray environment variable cannot make a user's run fail):

- `DIMCUT_TEST_SIGNAL=POINT:AT:SIGNAL` makes the process send itself SIGNAL (e.g. SIGKILL,
  SIGTERM, SIGINT) when it reaches POINT with a value ≥ AT. Points: `calibration` (value:
  decoder layers finished), `heal` (value: training steps finished), `write` (fraction of the output bytes written by the engine),
  `written` (value 1: the output is complete, the summary not printed yet).
- `DIMCUT_FAULT_WRITE_AFTER=N` makes the engine's shard writes fail with "no space left on
  device" once N bytes of tensor data were written, as a full disk would.

Unarmed, `reached` costs one attribute lookup.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

SIGNAL_ENV = "DIMCUT_TEST_SIGNAL"
WRITE_FAULT_ENV = "DIMCUT_FAULT_WRITE_AFTER"


@dataclass(frozen=True)
class SignalHook:
    point: str
    at: float
    signal: signal.Signals

    @classmethod
    def parse(cls, spec: str) -> SignalHook:
        point, at, name = spec.split(":")
        return cls(point, float(at), signal.Signals[name])


# The armed hooks (none unless `arm` was called by the test entry point or a test).
_signal_hook: SignalHook | None = None
_write_fault_after: int | None = None


def arm(environ: Mapping[str, str]) -> None:
    """Arms the hooks `environ` sets (the test entry point passes `os.environ`)."""
    global _signal_hook, _write_fault_after
    spec, fault = environ.get(SIGNAL_ENV), environ.get(WRITE_FAULT_ENV)
    _signal_hook = SignalHook.parse(spec) if spec else None
    _write_fault_after = int(fault) if fault else None


def reached(point: str, value: float) -> None:
    """Sends the armed signal, once, when `point` reaches the armed value."""
    global _signal_hook
    hook = _signal_hook
    if hook is not None and hook.point == point and value >= hook.at:
        _signal_hook = None  # once
        os.kill(os.getpid(), hook.signal)


def watches(point: str) -> bool:
    """Whether a signal is armed at `point` (callers skip the work of reporting otherwise)."""
    return _signal_hook is not None and _signal_hook.point == point


def engine_faults() -> dict[str, int]:
    """The engine's hidden fault keyword arguments, when armed (else none)."""
    return {} if _write_fault_after is None else {"_fail_writes_after": _write_fault_after}
