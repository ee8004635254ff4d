"""The ways a command ends badly, each with its own exit code (README.md, docs/json.md)."""

from __future__ import annotations


class BsplanError(Exception):
    """An error with one sentence for the user and the exit code scripts branch on."""

    exit_code = 1

    def to_dict(self) -> dict[str, object]:
        return {"error": str(self), "kind": type(self).__name__}


class BadInput(BsplanError):
    """The user's options or model file are wrong before anything ran (exit 2)."""

    exit_code = 2


class UserCodeError(BsplanError):
    """The user's own code raised an ordinary error (not out-of-memory): show their traceback (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, traceback_text: str) -> None:
        super().__init__(message)
        self.traceback_text = traceback_text

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "traceback": self.traceback_text}


class NoFit(BsplanError):
    """Not even the model fits on the device, before any batch (exit 3, as when no batch fits)."""

    exit_code = 3


def first_line(error: BaseException) -> str:
    """An exception's first line, short enough for a table and a JSON field."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
