"""Errors that the CLI turns into one clear line instead of a traceback."""

from __future__ import annotations


class SelfalignError(Exception):
    """A user-facing error: bad input, a missing model, a bad config. The CLI prints `str(err)` and exits 2."""


class DataError(SelfalignError):
    """Bad input data, located by file, line and field."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        field_part = f"field '{field}': " if field else ""
        super().__init__(f"{where}{field_part}{message}")


class ConfigError(SelfalignError, ValueError):
    """A config file, override or setting that is not valid (a ValueError too, for callers that catch those)."""


class ModelNotFoundError(SelfalignError):
    """A model spec that resolves to nothing loadable on this machine."""
