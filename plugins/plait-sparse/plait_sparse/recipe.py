"""The ``llmcompressor:`` block and the part of an llm-compressor recipe Plait runs.

Axolotl's LLMCompressorPlugin hands ``llmcompressor.recipe`` to llm-compressor,
whose ``ConstantPruningModifier`` is what a sparse fine-tune uses: at its
``start`` step it records, for every parameter its ``targets`` name, which
entries are non-zero (``|w| > 1e-8``, llm-compressor's rule), and after every
optimizer step from then on it multiplies the parameter by that mask, so the
pruned entries stay exactly zero. Plait runs that meaning itself (no
llm-compressor needed); any other modifier (quantization, pruning that
*creates* sparsity, distillation) is refused by name.

A recipe is nested as llm-compressor writes it: stages (any name) holding
modifier groups (names ending in ``_modifiers``) holding modifiers by class
name; a group may also sit at the top level::

    recipe:
      finetuning_stage:
        finetuning_modifiers:
          ConstantPruningModifier:
            targets: ['re:.*q_proj.weight', 'model.layers.0.mlp.up_proj.weight']
            start: 0

A target is a parameter's full name, a regex after ``re:`` (matched from the
start of the name, as llm-compressor's ``re.match`` does), or a module class
name (that module's ``weight``). ``start``/``end`` count optimizer steps (Axolotl
starts llm-compressor's session without an epoch length, so its index is the
global step); ``end`` unset or -1: to the end of training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import Field

from plait.config import StrictModel
from plait.errors import ConfigError

KEY = "llmcompressor"
MODIFIER = "ConstantPruningModifier"
#: the keys of a ConstantPruningModifier that Plait runs
MODIFIER_KEYS = ("targets", "start", "end")
#: llm-compressor's mask rule: entries at most this far from zero count as pruned
EPSILON = 1e-8


class LLMCompressorBlock(StrictModel):
    """Axolotl's ``llmcompressor:`` block (its LLMCompressorPlugin)."""

    recipe: Any = Field(
        ..., description="llm-compressor recipe: stages of *_modifiers groups; Plait runs ConstantPruningModifier "
        "(targets: parameter names, 're:' regexes or module class names; start / end: optimizer steps), which "
        "keeps the targeted parameters' zero entries at zero through training. Other modifiers are refused.")
    save_compressed: Optional[bool] = Field(
        False, description="Save in llm-compressor's compressed-tensors format. For a sparse model without "
        "quantization that format is plain safetensors (compressed-tensors dropped its sparse-bitmask formats "
        "after 0.14), so true and false write the same files: dense weights with their zeros, loadable by "
        "transformers and vLLM as is.")


class SparseKeys(StrictModel):
    """The keys plait-sparse owns."""

    llmcompressor: Optional[LLMCompressorBlock] = Field(
        None, description="Sparse fine-tuning of an already-sparse model (Axolotl's LLMCompressorPlugin): "
        "recipe (ConstantPruningModifier targets / start) and save_compressed. Needs no llm-compressor.")


@dataclass(frozen=True)
class ConstantPruning:
    """One ConstantPruningModifier: which parameters, from which step to which."""

    targets: tuple[str, ...]
    start: int = 0
    end: Optional[int] = None
    where: str = KEY  # the recipe path, for messages

    def matches(self, name: str, module_class: str) -> Optional[str]:
        """The target that selects parameter ``name`` (of a module of class
        ``module_class``), or ``None``."""
        for target in self.targets:
            if target.startswith("re:"):
                if re.match(target[3:], name):
                    return target
            elif target == name or (target == module_class and name.endswith(".weight")):
                return target
        return None

    def active(self, step: int) -> bool:
        return step >= self.start and (self.end is None or step < self.end)


def parse_recipe(recipe: Any) -> list[ConstantPruning]:
    """Every ConstantPruningModifier of ``recipe``; ConfigError naming the
    recipe path of anything else."""
    where = f"{KEY}.recipe"
    if not isinstance(recipe, dict) or not recipe:
        raise ConfigError(f"config key {where!r}: {recipe!r} is not a recipe; give a mapping of stages, e.g. "
                          f"{{finetuning_stage: {{finetuning_modifiers: {{{MODIFIER}: {{targets: [...], start: 0}}}}}}}}"
                          f" (a recipe file path is not read: give the recipe inline, as Axolotl does)")
    found: list[ConstantPruning] = []
    for name, value in recipe.items():
        if str(name).endswith("_modifiers"):
            found += _group(value, f"{where}.{name}")
        elif isinstance(value, dict):
            for group, modifiers in value.items():
                path = f"{where}.{name}.{group}"
                if str(group).endswith("_modifiers"):
                    found += _group(modifiers, path)
                elif group == "run_type" and modifiers == "train":
                    continue  # llm-compressor's stage kind; fine-tuning is what Plait does
                else:
                    raise ConfigError(f"config key {path!r}: a stage holds modifier groups, named ending in "
                                      f"'_modifiers' (e.g. finetuning_modifiers)")
        else:
            raise ConfigError(f"config key '{where}.{name}': {value!r} is not a stage (a mapping of *_modifiers "
                              f"groups)")
    if not found:
        raise ConfigError(f"config key {where!r}: the recipe holds no {MODIFIER}; sparse fine-tuning needs one")
    return found


def _group(modifiers: Any, path: str) -> list[ConstantPruning]:
    if not isinstance(modifiers, dict):
        raise ConfigError(f"config key {path!r}: {modifiers!r} is not a mapping of modifier class names to their "
                          f"arguments")
    found = []
    for modifier, args in modifiers.items():
        where = f"{path}.{modifier}"
        if modifier != MODIFIER:
            raise ConfigError(f"config key {where!r}: Plait runs only llm-compressor's {MODIFIER} (keeping a sparse "
                              f"model's zeros while it trains); {modifier} is not implemented (run llm-compressor "
                              f"itself for pruning or quantization, then fine-tune its output here)")
        found.append(_constant_pruning(args or {}, where))
    return found


def _constant_pruning(args: Any, where: str) -> ConstantPruning:
    if not isinstance(args, dict):
        raise ConfigError(f"config key {where!r}: {args!r} is not a mapping of {', '.join(MODIFIER_KEYS)}")
    unknown = [key for key in args if key not in MODIFIER_KEYS]
    if unknown:
        raise ConfigError(f"config key '{where}.{unknown[0]}': not a {MODIFIER} argument Plait runs; accepted: "
                          f"{', '.join(MODIFIER_KEYS)}")
    targets = args.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"config key '{where}.targets': {targets!r}; give a list of parameter names, 're:' "
                          f"regexes (e.g. 're:.*q_proj.weight') or module class names")
    for target in targets:
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as error:
                raise ConfigError(f"config key '{where}.targets': {target!r} is not a valid regex ({error})") from None
    start, end = args.get("start", 0), args.get("end")
    if start is None:
        start = 0
    if isinstance(start, bool) or not isinstance(start, (int, float)) or start < 0 or start != int(start):
        raise ConfigError(f"config key '{where}.start': {start!r}; give the optimizer step (0 or more, whole) at "
                          f"which the masks are taken")
    if end is not None and end != -1:
        if isinstance(end, bool) or not isinstance(end, (int, float)) or end != int(end) or end <= start:
            raise ConfigError(f"config key '{where}.end': {end!r}; give an optimizer step after start ({start}), "
                              f"or -1 / unset for the end of training")
        end = int(end)
    else:
        end = None
    return ConstantPruning(tuple(targets), int(start), end, where)
