"""The one exception for what a user can fix: a file, a flag, a config value, an argument.

Every command prints a UserError as `error: <message>` on one line and exits with status 2
(ldm/cli.py); any other exception is a bug and keeps its traceback. UserError is a ValueError,
so Python callers may catch either. A PerfusionWarning (a setting that runs but is known to do
badly) prints as `warning: <message>` on one line.
"""


class UserError(ValueError):
    """Bad input, named in a one-line message (the file or value, and what was expected)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError)."""


class NotAFolderError(UserError, NotADirectoryError):
    """A path the user gave as a folder is a file (also a NotADirectoryError)."""


class PerfusionWarning(UserWarning):
    """A setting that runs but is measured to do badly, named in a one-line message."""
