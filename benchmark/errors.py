"""User-facing errors.

Every problem caused by input (a name, a config value, a file) is raised as a
``BenchError`` whose message is one line naming the file, key or value and what
is allowed. The CLI prints that line and exits with code 2, without a traceback.
"""

from __future__ import annotations


class BenchError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2

    def __str__(self) -> str:  # one line, always
        text = str(self.args[0]) if self.args else ""
        return " ".join(text.split())


class UnknownNameError(BenchError, KeyError):
    """A registry lookup of a name that is not registered."""

    __str__ = BenchError.__str__


class DataError(BenchError):
    """A dataset source that is missing or malformed."""


class CheckpointError(BenchError):
    """A checkpoint that is missing, corrupt, tampered with or of the wrong shape."""
