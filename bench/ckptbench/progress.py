"""Child -> parent progress lines: one JSON message per line on the child's stdout."""

from __future__ import annotations

import json
import os

PREFIX = "@@bench "
QUIET_ENV = "CKPTBENCH_QUIET"
"""Set in a case's workers (``workers``): the case reports their progress itself."""


def emit(desc: str, advance: int = 1) -> None:
    """Tell the parent that one unit of the case's work is done (``desc``: what is next)."""
    if os.environ.get(QUIET_ENV) == "1":
        return
    print(PREFIX + json.dumps({"desc": desc, "advance": advance}), flush=True)


def parse(line: str) -> dict | None:
    """The message in a child's stdout line, or None for any other output."""
    if not line.startswith(PREFIX):
        return None
    return json.loads(line[len(PREFIX):])
