"""Configs are frozen dataclasses; these two functions take them to JSON and back, and
:func:`require` is the range check their ``__post_init__`` use for numbers.

``config_to_dict`` gives plain JSON values (tuples become lists, nested configs become dicts);
``config_from_dict`` rebuilds the dataclass, nested configs and tuples included, and refuses
unknown keys (a typo in a saved config should not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing

from lrcompress.errors import UserError


def require(flag: str, value, *, above: float | None = None, at_least: float | None = None,
            why: str = "") -> None:
    """Refuse a setting that is not a finite number in range (NaN and ±inf never pass):
    ``above`` is an open lower bound, ``at_least`` a closed one; ``why`` says what it is for."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and (above is None or value > above)
          and (at_least is None or value >= at_least))
    if ok:
        return
    bound = (f" > {above:g}" if above is not None else
             f" >= {at_least:g}" if at_least is not None else "")
    raise UserError(f"{flag} {value} is out of range: it must be a finite number{bound}"
                    f"{f' ({why})' if why else ''}.")


def config_to_dict(cfg) -> dict:
    """A frozen config as JSON-ready values (its own ``to_dict`` when it has one)."""
    to_dict = getattr(cfg, "to_dict", None)
    d = to_dict() if to_dict is not None else dataclasses.asdict(cfg)
    return _plain(d)


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def config_from_dict(cls, d: dict):
    """Rebuild ``cls`` from :func:`config_to_dict`'s output."""
    if not isinstance(d, dict):
        raise UserError(f"A {cls.__name__} must be given as a JSON object, not "
                        f"{type(d).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"Unknown {cls.__name__} field(s): {', '.join(unknown)}. Known: "
                        f"{', '.join(sorted(names))}.")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _revive(hints[k], v) for k, v in d.items()})


def _revive(hint, v):
    if v is None:
        return None
    for t in _candidates(hint):
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            return config_from_dict(t, v)
        if typing.get_origin(t) is tuple and isinstance(v, list):
            return tuple(v)
    return v


def _candidates(hint) -> tuple:
    """The alternatives of ``X | Y | None`` (or the hint itself)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in args if a is not type(None))
    return (hint,)
