"""The one convention of bsplan's results: frozen dataclasses whose JSON document is to_dict()."""

from __future__ import annotations

import dataclasses
from typing import Any


class Record:
    """A result's JSON document: its fields, nested results as theirs and choices as their values. A
    class that shows derived numbers too (a total, a sum) extends to_dict; one that is read back
    from JSON has a from_dict classmethod (planning/saved.py)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]
