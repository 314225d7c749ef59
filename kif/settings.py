"""A method's settings as users give them (`--set key=value`, a mapping in Python), checked
against its config dataclass before anything is loaded: an unknown name or a value of the wrong
type is a one-line error naming the setting."""

import dataclasses
import numbers
import os
import types
import typing
from typing import Any, Mapping

from kif.errors import KifError

_SIMPLE = (bool, int, float, str, tuple)


def checked(method: str, cfg_type: type, user: Mapping[str, Any]) -> dict[str, Any]:
    """`user`'s settings for `method`'s config `cfg_type`: refused when a name is not a field or a
    value does not suit the field's type; an int given for a float field becomes a float and a
    list for a tuple field a tuple, so the config holds what it declares."""
    fields = {f.name for f in dataclasses.fields(cfg_type)}
    bad = sorted(set(user) - fields)
    if bad:
        raise KifError(f"method {method!r} has no setting {bad[0]!r} "
                       f"(settings: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cfg_type)
    out = {}
    for key, value in user.items():
        hint = hints.get(key, Any)
        if not _fits(value, hint):
            raise KifError(f"method {method!r} setting {key!r} takes {_type_name(hint)}, "
                           f"got {value!r}")
        out[key] = _coerced(value, hint)
    return out


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` suits a field annotated `hint`. Only the simple annotations are checked
    (bool, int, float, str, tuple and the elements of tuple[X, ...], their unions with None); a
    float field takes an int, a tuple field a list, a str field a path, and an int or float field
    never takes a bool. Anything else passes."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    args, hint = typing.get_args(hint), typing.get_origin(hint) or hint
    if hint is tuple and isinstance(value, (tuple, list)) and len(args) == 2 and args[1] is ...:
        return all(_fits(v, args[0]) for v in value)  # tuple[X, ...]: every element an X
    if hint not in _SIMPLE:
        return True
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, numbers.Real)
    if hint is int:
        return isinstance(value, numbers.Integral)
    if hint is tuple:  # the CLI gives tuples; a list from Python is as good
        return isinstance(value, (tuple, list))
    if hint is str:  # a path for a folder setting (undo's teacher, an SAE)
        return isinstance(value, (str, os.PathLike))
    return isinstance(value, hint)


def _coerced(value: Any, hint: Any) -> Any:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                 types.UnionType) else (hint,)
    bases = {typing.get_origin(a) or a for a in args}
    if isinstance(value, bool) or value is None:
        return value
    if float in bases and int not in bases and isinstance(value, numbers.Real):
        return float(value)
    if tuple in bases and isinstance(value, list):
        return tuple(value)
    if str in bases and isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is ...:
        return f"a tuple of {_type_name(args[0])}"
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


__all__ = ["checked"]
