"""The one convention of bsplan's results: frozen dataclasses whose JSON document is to_dict()."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any


class Record:
    """A result whose to_dict() is its JSON document, in plain types: its fields (document()), with
    choices as their values and tuples as lists. A class that shows derived numbers too (a total, a
    sum) extends document(); one that is read back from JSON has a from_dict classmethod
    (planning/saved.py)."""

    def document(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    def to_dict(self) -> dict[str, Any]:
        return _plain(self.document())  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
