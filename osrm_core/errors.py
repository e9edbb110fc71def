"""The errors that mean "bad input": the caller's fault, not a bug of the workbench.

Every one subclasses :class:`OsrmInputError` (itself a ``ValueError``), carries a one-line
message naming the wrong thing and what is allowed, and makes the ``osrm`` command exit with
status 2 without a traceback; any other exception is a bug and exits with status 1.
"""

from __future__ import annotations


class OsrmInputError(ValueError):
    """An argument, file, setting or environment variable the workbench cannot use."""


class InputTypeError(OsrmInputError, TypeError):
    """An argument of the wrong type (also a ``TypeError``, as Python's own checks raise)."""


class ConfigError(OsrmInputError):
    """The run configuration is invalid; the message names the field."""


class DataError(OsrmInputError):
    """A task's data cannot be used; the message says what is wrong and what is allowed."""


class AdapterError(OsrmInputError):
    """An adapter cannot be used; the message says what is wrong."""


class ArchiveError(OsrmInputError):
    """An uploaded archive is broken, too large or unsafe; the message says which."""


class RunFileError(OsrmInputError):
    """A file of a run directory is damaged; the message starts with its path in the run."""


class LockedError(OsrmInputError):
    """The directory is being written by another process or session; the message names it."""


class UsageError(OsrmInputError):
    """A command-line flag is missing, repeated or malformed; the message names the flag."""
