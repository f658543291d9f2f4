"""The exception types of bnnzoo: every error the package raises on purpose is a :class:`BnnzooError`
whose message names what is wrong (an option, a file, a data column, the epoch a fit diverged in)."""

from __future__ import annotations

from .guides.training import DivergenceError
from .models.errors import BnnzooError, ConfigError, DataError, NotFittedError, RunError

__all__ = ["BnnzooError", "ConfigError", "DataError", "DivergenceError", "NotFittedError", "RunError"]
