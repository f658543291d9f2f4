"""The exception types of bnnzoo. Every error the package raises on purpose is a :class:`BnnzooError`,
so a caller can tell "bnnzoo refused this, and said why" from a bug; each also derives from the
built-in type a Python user would expect (``ValueError``, ``FloatingPointError``, ...).

They live in the lowest layer so that models, guides and the package above raise the same types;
users import them from :mod:`bnnzoo.errors`.
"""

from __future__ import annotations


class BnnzooError(Exception):
    """Base of every error bnnzoo raises on purpose; the message names what is wrong and where."""


class ConfigError(BnnzooError, ValueError):
    """A bad option: unknown name, wrong type, out of range or not one of the allowed values. The
    message names the option and what is allowed."""


class DataError(BnnzooError, ValueError):
    """Bad or missing data. The message names the file, column or argument at fault."""


class RunError(BnnzooError, ValueError):
    """A saved run that cannot be used: missing, corrupt, of another format, or inconsistent. The
    message names the run directory and the file at fault."""


class NotFittedError(BnnzooError, RuntimeError):
    """A posterior used before it was fitted."""
