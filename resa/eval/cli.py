"""`resa eval <task>`: argument parsing for the evaluation harness."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `eval` command and its tasks to the top-level parser."""
    p = sub.add_parser("eval", help="quality of ReSA against dense on real models and text")
    p.add_subparsers(dest="task", required=True)
