"""The one exception type for bad data (defined with the package's other errors)."""

from __future__ import annotations

from ..models.errors import DataError

__all__ = ["DataError"]
