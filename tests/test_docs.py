"""The README a newcomer reads: short, its two set-up commands, and no link into the void (the
docs/ site's own links are checked by `mkdocs build --strict`, which CI runs)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_links_point_at_files_that_exist():
    targets = re.findall(r"\]\(([^)#\s]+)", README.read_text())
    local = [target for target in targets if "://" not in target]
    assert local, "the README links into docs/"
    assert [target for target in local if not (ROOT / target).exists()] == []


def test_readme_is_short_and_holds_exactly_two_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    set_up = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", set_up, re.DOTALL)
    assert len(commands) == 2 and all("\n" not in command for command in commands)
    install, tests = commands
    assert "dimcut slice" in install and "--format plain" in install
    assert tests.endswith("cargo test --release && python3 -m pytest -q")
    # CI runs the same test command.
    assert "cargo test --release && python3 -m pytest -q" in (ROOT / ".ci" / "run").read_text()
