"""Test entry point: `python -m dimcut._hooks <dimcut arguments>` arms the hooks from the
environment, then runs the `dimcut` command line."""

import os
import sys

from dimcut import _hooks
from dimcut.cli import main

_hooks.arm(os.environ)
sys.exit(main(sys.argv[1:]))
