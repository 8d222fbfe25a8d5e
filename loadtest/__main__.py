"""`python -m loadtest --help`: the load generator (loadtest/cli.py)."""

from __future__ import annotations

import sys

from loadtest.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; everything started was stopped")
