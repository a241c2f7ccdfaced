"""Exit statuses shared by every `arca-lab` command (BSD sysexits numbers where one fits).

0           success
1           a check or verification failed (`verify-bound`, `theory check`), or the analysis notebook failed
1..63       `sweep`: the number of failed runs (+1 if the analysis notebook failed), capped at 63
64          EX_USAGE: bad input (arguments, config values, paths), reported before anything runs
75          EX_TEMPFAIL: the sweep directory is locked by another sweep or report; try again when it ends
"""

from __future__ import annotations

import argparse
import sys

EX_USAGE = 64
EX_TEMPFAIL = 75


class UsageParser(argparse.ArgumentParser):
    """argparse, but bad arguments exit with EX_USAGE (argparse's 2 would read as "2 runs failed" for a sweep)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")
