"""What every command-line entry point shares: one-line errors for what the user can fix."""
from __future__ import annotations

import errno
import sys
import threading
import warnings
from typing import Callable

from ldm.errors import PerfusionWarning, UserError

# Operating-system failures the user fixes outside the program (space, a file-size limit, permissions,
# a read-only disk).
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


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
    hook = threading.excepthook

    def quiet_threads(args):   # a background writer (TensorBoard's) that hit a full disk: the main error says it
        if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in USER_ERRNOS):
            hook(args)

    threading.excepthook = quiet_threads
    try:
        code = main()
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        code = 2
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        # a full disk often fails twice (a file, then a logger flushing at shutdown): name the first file
        named = next((e.filename for e in exception_chain(err) if isinstance(e, OSError) and e.filename), None)
        where = f"{named}: " if named else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        warnings.showwarning, threading.excepthook = show, hook
    sys.exit(code or 0)


def parse_device(text: str | None, flag: str = "--device"):
    """A torch device from a flag (None: cuda if present, else cpu), refused on one line when it is not a
    device or not on this machine; checked before any work."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"{flag} {text!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag} {text!r}: expected cpu, cuda[:N] or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {text}: no CUDA GPU is available here; use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {text}: no Apple GPU (MPS) is available in this PyTorch; use {flag} cpu")
    return device


def exception_chain(err: BaseException):
    """`err` and the exceptions it was raised while handling, oldest last."""
    while err is not None:
        yield err
        err = err.__context__
