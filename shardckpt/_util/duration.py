"""Durations on the command line: '500ms', '90', '90s', '15m', '1h', '2d' -> seconds."""

from __future__ import annotations

import argparse
import re

_UNITS = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """Seconds in ``text``; an ``argparse`` type, so bad input is a usage error (exit 2)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|[smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 500ms, 30s, 15m, 1h, 2d)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]
