"""Test hooks for interruption tests: `DIMCUT_TEST_SIGNAL=POINT:AT:SIGNAL` makes the process
send itself SIGNAL (e.g. SIGKILL, SIGTERM, SIGINT) when it reaches POINT with a value ≥ AT.

Points: `calibration` (value: decoder layers finished), `write` (fraction of the output bytes
written by the engine), `written` (value 1: the output is complete, the summary not printed yet).
Unset (always, outside the test suite) it costs one environment lookup per call.
"""

from __future__ import annotations

import os
import signal

ENV = "DIMCUT_TEST_SIGNAL"


def reached(point: str, value: float) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, at, name = spec.split(":")
    if where == point and value >= float(at):
        os.environ.pop(ENV)  # once
        os.kill(os.getpid(), getattr(signal, name))
