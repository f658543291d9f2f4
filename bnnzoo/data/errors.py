"""The one exception type for bad data."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing data. The message names the file, column or argument at fault."""
