"""Typed dataclasses for configuration: documented fields, type coercion, named errors.

The one mechanism behind every config section (:mod:`dapo_megatron.config.schema`) and the
algorithm config (:mod:`dapo_megatron.algo.config`). A section is a dataclass deriving from
:class:`TypedSection`; its fields are declared with :func:`doc_field` (documentation in
``metadata["doc"]``); construction coerces every value to its annotation (naming the field on a
mismatch) and runs :meth:`TypedSection.validate`. Frozen dataclasses are supported.

Pure Python; imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, ClassVar, Literal

__all__ = ["TypedSection", "coerce", "doc_field", "type_name"]


def doc_field(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation in ``metadata["doc"]``."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", repr(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it, lightly coerced.

    Coercions: int -> float; a string that parses as a float for float fields (YAML 1.1 reads
    ``1e-6`` as a string); a single string for ``list[str]`` fields; tuples -> lists.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ValueError as exc:
                errors.append(exc)
        raise ValueError(f"{path} must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"{path} must be {type_name(tp)}, got {value!r}{extra}")
    if origin is list:
        (item_tp,) = args or (Any,)
        if isinstance(value, str) and item_tp is str:
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list of {type_name(item_tp)}, got {value!r}")
        return [coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{path} must be a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{path} must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{path} must be a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path} must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {path}")  # programming error


class TypedSection:
    """Base for config sections: type-checks every field, then runs :meth:`validate`."""

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(  # works for frozen sections too
                self, f.name, coerce(getattr(self, f.name), hints[f.name], self._path(f.name))
            )
        self.validate()

    def _path(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def _require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{self._path(name)} must be {expected}, got {getattr(self, name)!r}")

    def validate(self) -> None:
        """Check value ranges; raise ``ValueError`` naming the field. Re-run after mutation."""
