"""The config reference: every key of core and of each installed plugin.

Reads the run's config class the way ``plait train`` builds it (core's
``CoreConfig`` combined with every plugin's ``config_schema`` model), walks
into nested sections (``datasets[]``, ``pretraining_dataset[]`` and any other
pydantic model a key holds) and renders one table per owner: key, type,
default, allowed values, description, and what the key is in Axolotl.

``rows(pm)`` is what the documentation test checks (every key described).
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HERE = Path(__file__).parent
NO_EFFECT_MARKERS = ("no effect", "accepted for axolotl compatibility", "accepted so axolotl configs load")


@dataclass
class Row:
    section: str  # "" for top-level keys, "datasets[]" for a dataset entry's keys, ...
    key: str
    type: str
    default: str
    allowed: str
    description: str
    owner: str  # the distribution that declares the key
    axolotl: str


def axolotl_key_names() -> set[str]:
    lines = (HERE / "axolotl_key_names.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


@functools.lru_cache(maxsize=None)
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # scans every installed distribution: once


def _distribution_of(module: str) -> str:
    top = module.split(".")[0]
    return ", ".join(_packages_distributions().get(top, [top]))


def type_name(annotation) -> str:
    """A short, readable type: ``int``, ``bool | "offload"``, ``list[str]``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        optional = len(parts) < len(args)
        return " | ".join(parts) + (" | null" if optional else "")
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "mapping"
        return {"NoneType": "null", "Any": "any"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _literals(annotation) -> list:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return list(args)
    return [value for arg in args for value in _literals(arg)]


def allowed_values(field) -> str:
    """Literal choices and numeric bounds of a field."""
    parts = []
    literals = _literals(field.annotation)
    if literals:
        parts.append(", ".join(json.dumps(v) for v in literals))
    for constraint in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(constraint, attr, None)
            if bound is not None:
                parts.append(f"{symbol} {bound}")
    return "; ".join(parts)


def default_text(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return json.dumps(value, default=str)


def nested_models(annotation) -> list[type[BaseModel]]:
    """The pydantic models a key's value holds (list entries, union members)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        for model in nested_models(arg):
            if model not in found:
                found.append(model)
    return found


def axolotl_meaning(key: str, description: str, known: set[str]) -> str:
    if any(marker in description.lower() for marker in NO_EFFECT_MARKERS):
        return "Axolotl key; accepted, no effect in Plait"
    if key in known:
        return "Axolotl key"
    return "Plait only"


def _common_base(models: list[type[BaseModel]]) -> type[BaseModel] | None:
    """The most derived model every one of ``models`` inherits from (core's
    ``DatasetEntry`` for the dataset formats' entry models)."""
    for candidate in models[0].__mro__:
        if (isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate.model_fields
                and all(issubclass(m, candidate) for m in models)):
            return candidate
    return None


def _format_names(pm) -> dict[type, list[str]]:
    """Entry model -> the dataset ``type:`` names that select it."""
    from plait.registries import registry

    names: dict[type, list[str]] = {}
    for name, fmt in registry(pm, "dataset_formats").items():
        names.setdefault(fmt.entry_model, []).append(name)
    return names


def rows(pm) -> list[Row]:
    """Every key of the run's config, nested sections included.

    A key holding a union of entry models (``datasets``: one model per dataset
    format) gives one section for the keys every entry has, then one per
    model with only the keys it adds, named by the ``type:`` values that
    select it.
    """
    from plait.config import config_class
    from plait.config.schema import CoreConfig

    cls = config_class(pm)
    owners = {key: "plait" for key in CoreConfig.model_fields}
    for impl in pm.hook.config_schema.get_hookimpls():
        model = impl.function()
        if model is not None:
            owners.update({key: _distribution_of(model.__module__) for key in model.model_fields})
    known = axolotl_key_names()
    format_names = _format_names(pm)
    out: list[Row] = []
    seen: set[type] = set()

    def add(model: type[BaseModel], section: str, owner_of, skip=frozenset()) -> None:
        fields = {key: field for key, field in model.model_fields.items() if key not in skip}
        for key, field in fields.items():
            description = (field.description or "").strip()
            out.append(Row(section, key, type_name(field.annotation), default_text(field), allowed_values(field),
                           description, owner_of(key), axolotl_meaning(key, description, known)))
        for key, field in fields.items():
            children = [m for m in nested_models(field.annotation) if m not in seen]
            if not children:
                continue
            seen.update(children)
            parent = f"{section + '.' if section else ''}{key}[]"
            base = _common_base(children) if len(children) > 1 else None
            if base is None:
                for child in children:
                    owner = _distribution_of(child.__module__)
                    add(child, parent, lambda _key, owner=owner: owner)
                continue
            base_owner = _distribution_of(base.__module__)
            add(base, parent, lambda _key: base_owner)
            for child in children:
                own = set(child.model_fields) - set(base.model_fields)
                if child is base or not own:
                    continue
                types = ", ".join(format_names.get(child, [child.__name__]))
                owner = _distribution_of(child.__module__)
                add(child, f"{parent} type: {types}", lambda _key, owner=owner: owner,
                    skip=frozenset(base.model_fields))

    add(cls, "", lambda key: owners.get(key, "plait"))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else ""


def _code(text: str) -> str:
    return f"`{text}`".replace("|", "\\|") if text else ""


def render(pm) -> str:
    all_rows = rows(pm)
    lines = [
        "# Config reference",
        "",
        "Generated from the config schemas of core and of every plugin installed when the site was built",
        "(`make docs`); `plait config schema` prints the same as JSON schema. Keys are flat, as in Axolotl:",
        "a plugin's keys sit beside core's. *Axolotl* says whether the key exists in Axolotl's schema",
        "(same name; where Plait's meaning differs, the description says so), is accepted there and",
        "ignored here, or is Plait's own.",
        "",
    ]
    sections: dict[tuple[str, str], list[Row]] = {}
    for row in all_rows:
        sections.setdefault((row.section, row.owner if not row.section else ""), []).append(row)
    top_owners = sorted({owner for section, owner in sections if not section}, key=lambda o: (o != "plait", o))
    ordered = [("", owner) for owner in top_owners] + [key for key in sections if key[0]]
    for key in ordered:
        section, owner = key
        group = sections[key]
        if section and " type: " in section:
            parent, types = section.split(" type: ")
            title = f"`{parent}` entries of type {', '.join(f'`{t}`' for t in types.split(', '))}"
            note = (f"Keys these formats add to an entry of `{parent.split('[')[0]}`, besides the keys every entry "
                    f"has (declared by `{group[0].owner}`).")
        elif section:
            title = f"`{section}` entries"
            note = f"Keys of each entry of `{section.split('[')[0]}` (declared by `{group[0].owner}`)."
        else:
            title = "Core keys (`plait`)" if owner == "plait" else f"Keys of `{owner}`"
            note = ("Declared by core." if owner == "plait"
                    else f"Present when `{owner}` is installed (`pip install {owner}`).")
        lines += [f"## {title}", "", note, "",
                  "| key | type | default | allowed | description | Axolotl |",
                  "|---|---|---|---|---|---|"]
        for row in group:
            lines.append(f"| `{row.key}` | {_code(row.type)} | {_code(row.default)} | {_cell(row.allowed)} | "
                         f"{_cell(row.description) or '**undocumented**'} | {row.axolotl} |")
        lines.append("")
    return "\n".join(lines)
