"""What every command-line entry point shares: one-line errors instead of tracebacks."""
from __future__ import annotations

import sys
from typing import Callable

from ldm.build import ConfigError
from ldm.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError)


def run_cli(main: Callable[[], int]) -> None:
    """Run `main`; a user error prints `error: <message>` on one line and exits with status 2."""
    try:
        code = main()
    except USER_ERRORS as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
