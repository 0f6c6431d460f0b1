"""The one config style: frozen dataclasses that validate themselves and round-trip through JSON.

Every config of the package (diffusion, training, VAE, text encoder, UNets, text-to-image) derives
from :class:`Config`: ``to_dict()`` gives plain JSON-able values, ``from_dict`` refuses unknown keys
by name (a typo in a config file must not be silently ignored) and rebuilds nested configs, and
``replace`` returns a validated copy. It lives at the top of the package so that ``nets/`` and
``training/`` can both use it without importing each other.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


def _nested_config_types(cls: type) -> dict[str, type[Config]]:
    """Field name → Config subclass, for the fields whose annotation is a Config."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - an unresolvable annotation: no nested configs
        return {}
    return {name: tp for name, tp in hints.items() if isinstance(tp, type) and issubclass(tp, Config)}


class Config:
    """Base of the frozen config dataclasses: dict round-trip with unknown keys refused, ``replace``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (nested configs as dicts, tuples as lists): what ``json.dumps`` takes."""
        return _jsonable(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The config a :meth:`to_dict` dict describes; unknown keys are a ValueError that lists the valid ones."""
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict; got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
            )
        d = dict(d)
        for name, sub in _nested_config_types(cls).items():
            if isinstance(d.get(name), dict):
                d[name] = sub.from_dict(d[name])
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if isinstance(d.get(f.name), list) and isinstance(f.default, tuple):
                d[f.name] = tuple(d[f.name])  # JSON has no tuples
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} key(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
