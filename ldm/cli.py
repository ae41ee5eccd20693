"""What every command-line entry point shares: one-line errors for what the user can fix."""
from __future__ import annotations

import errno
import sys
import warnings
from typing import Callable

from ldm.errors import PerfusionWarning, UserError

# Operating-system failures the user fixes outside the program (space, permissions, a read-only disk).
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def run_cli(main: Callable[[], int]) -> None:
    """Run `main`; a UserError (or a full, read-only or forbidden disk) prints `error: <message>` on one
    line and exits with status 2, Ctrl-C exits with 130, and any other exception keeps its traceback.
    A PerfusionWarning prints as `warning: <message>` on one line."""
    show = warnings.showwarning

    def one_line(message, category, *args, **kwargs):
        if issubclass(category, PerfusionWarning):
            print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = one_line
    try:
        code = main()
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        code = 2
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        warnings.showwarning = show
    sys.exit(code or 0)
