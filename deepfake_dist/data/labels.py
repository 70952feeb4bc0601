"""How a sample's label (0 real, 1 fake) is read: the rule a shard set's manifest records.

Sets made by ``prepare`` and ``generate`` store it in a ``cls`` member (``0`` / ``1``), as
WebDataset's classification sets do. Sets made elsewhere and indexed with ``deepfake-dist shards
index`` may keep it in another member (``--label-key KEY``), in a field of their ``json`` member
(``--label-key json:FIELD``, dots for nested fields) or in the sample's key, e.g. a folder name
(``--label-from-path PATTERN``: a regular expression searched in the key, whose named group
``real`` or ``fake`` matched, or whose first group reads as a label). A label's text is ``0``,
``1``, ``real`` or ``fake`` (any case).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from deepfake_dist.errors import UserError

_VALUES = {"0": 0, "1": 1, "real": 0, "fake": 1}


def label_value(value: Any) -> int | None:
    """0 / 1 for a label written as 0, 1, real or fake (text, bytes or a number); None otherwise."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return None
    return _VALUES.get(str(value).strip().lower())


@dataclass(frozen=True)
class LabelRule:
    """One of: ``member`` (a member's text), ``json_field`` (a field of the json member),
    ``pattern`` (a regular expression searched in the sample's key)."""

    member: str | None = "cls"
    json_field: str | None = None
    pattern: str | None = None

    @classmethod
    def from_options(cls, label_key: str | None, label_from_path: str | None) -> LabelRule:
        """The rule ``shards index`` was given (``--label-key`` or ``--label-from-path``)."""
        if label_key and label_from_path:
            raise UserError("--label-key and --label-from-path: give one of them")
        if label_from_path:
            try:
                re.compile(label_from_path)
            except re.error as err:
                raise UserError(f"--label-from-path {label_from_path!r}: not a regular expression ({err})") from None
            return cls(member=None, pattern=label_from_path)
        key = label_key or "cls"
        if key.startswith("json:"):
            if not key[5:]:
                raise UserError("--label-key json:FIELD: name the field, e.g. json:label")
            return cls(member=None, json_field=key[5:])
        return cls(member=key.lower())

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> LabelRule:
        found = manifest.get("labels") or {"member": "cls"}
        return cls(found.get("member"), found.get("json"), found.get("key_pattern"))

    def to_manifest(self) -> dict[str, str]:
        if self.pattern is not None:
            return {"key_pattern": self.pattern}
        return {"json": self.json_field} if self.json_field is not None else {"member": self.member}

    def describe(self) -> str:
        if self.pattern is not None:
            return f"the key pattern {self.pattern!r}"
        return f"json field {self.json_field!r}" if self.json_field is not None else f"member {self.member!r}"

    def reads(self, name: str) -> bool:
        """Whether the member ``name`` (``KEY.EXT`` in a shard) must be read to find the label."""
        dot = name.find(".", name.rfind("/") + 1)
        return dot >= 0 and name[dot + 1:].lower() == (self.member if self.json_field is None else "json")

    def label(self, sample: dict) -> int:
        """The sample's label; a ValueError saying why when it has none."""
        if self.pattern is not None:
            return self._from_key(sample["__key__"])
        if self.json_field is not None:
            if "json" not in sample:
                raise ValueError("it has no json member (label)")
            try:
                value = json.loads(sample["json"])
                for part in self.json_field.split("."):
                    value = value[part]
            except (ValueError, KeyError, TypeError, IndexError):
                raise ValueError(f"its json member has no field {self.json_field!r} (label)") from None
        elif self.member not in sample:
            raise ValueError(f"it has no {self.member} (label) member")
        else:
            value = sample[self.member]
        label = label_value(value)
        if label is None:
            raise ValueError(f"its label {value!r} is not 0, 1, real or fake")
        return label

    def _from_key(self, key: str) -> int:
        match = re.search(self.pattern, key)
        if match is None:
            raise ValueError(f"its key matches no label pattern {self.pattern!r}")
        named = [name for name in ("real", "fake") if match.groupdict().get(name) is not None]
        if named:
            return _VALUES[named[0]]
        label = label_value(match.group(1) if match.re.groups else match.group(0))
        if label is None:
            raise ValueError(f"its key's label {match.group(1) if match.re.groups else match.group(0)!r} is not "
                             "0, 1, real or fake (name the groups (?P<real>...) and (?P<fake>...))")
        return label
