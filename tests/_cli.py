"""Run the `snd` CLI in-process and return its exit code (0 ok, 2 SndError, ...), for tests."""
from __future__ import annotations

from snd.cli import main


def run_cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
