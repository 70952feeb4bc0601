"""Name -> constructor registries filled by a decorator where each thing is defined (timm style)."""

from __future__ import annotations

import difflib
from typing import Any, Callable

from deepfake_dist.errors import UserError


def closest(name: str, choices) -> str:
    """A ' (did you mean X?)' hint for a misspelled name (whatever its case), or ''."""
    by_lower = {str(choice).lower(): choice for choice in choices}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean '{by_lower[match[0]]}'?)" if match else ""


class Registry:
    """Maps names to callables; each entry may carry metadata (e.g. the model's kind)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[Callable, dict[str, Any]]] = {}

    def register(self, name: str, **meta: Any):
        def wrap(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = (fn, meta)
            return fn

        return wrap

    def get(self, name: str) -> Callable:
        return self._entry(name)[0]

    def meta(self, name: str) -> dict[str, Any]:
        return self._entry(name)[1]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str):
        if name not in self._entries:
            raise UserError(
                f"unknown {self.kind} '{name}'{closest(name, self._entries)}; "
                f"choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]
