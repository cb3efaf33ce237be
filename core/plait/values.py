"""Config values read as given: never a boolean as a number, never a string as its characters.

pydantic's lax mode takes ``true`` for ``1`` and ``1.0`` (``learning_rate:
true`` trained at 1.0), and YAML's ``.inf`` and ``.nan`` pass a float field.
:class:`ValuesAsGiven` is the base of every config model of core (the run's
keys, a ``datasets:`` entry, a format's entry model) and of plugins' models
built on them: a boolean where the field takes no boolean is refused, a single
string for a list field becomes a one-element list (``plugins: a.module``),
and infinity or NaN is refused for every float.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, field_validator

KIND_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "a mapping", list: "a list"}


def admits(annotation, kind: type) -> bool:
    """Whether a field annotated ``annotation`` takes a ``kind`` value as it is
    (``Optional[Union[bool, Literal["auto"]]]`` admits bool; ``float`` does not)."""
    if annotation is Any or annotation is kind:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(isinstance(arg, kind) for arg in typing.get_args(annotation))
    if origin in (Union, types.UnionType, typing.Annotated):
        return any(admits(arg, kind) for arg in typing.get_args(annotation))
    return False


def is_list_field(annotation) -> bool:
    """A list field that takes no single string (``list[str]``, ``Optional[list[X]]``)."""
    if admits(annotation, str):
        return False
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    return origin in (Union, types.UnionType) and any(is_list_field(arg) for arg in typing.get_args(annotation))


def expected(annotation) -> str:
    """What a field takes, in words: ``"an integer"``, ``"a number or a string"``."""
    kinds = [KIND_NAMES[k] for k in KIND_NAMES if admits(annotation, k) or typing.get_origin(annotation) is k
             or any(typing.get_origin(a) is k for a in typing.get_args(annotation))]
    return " or ".join(dict.fromkeys(kinds)) or "another value"


def not_empty(value):
    """A field validator for paths and names: ``""`` names nothing (``path: ""`` read every file under the
    working directory)."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty string names nothing; give a path or a name")
    return value


class ValuesAsGiven(BaseModel):
    """Base of config models: values are read as given (module docstring)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _read_as_given(cls, value, info):
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and not admits(annotation, bool):
            raise ValueError(f"a boolean where {expected(annotation)} is expected")
        if isinstance(value, str) and is_list_field(annotation):
            return [value]
        return value
