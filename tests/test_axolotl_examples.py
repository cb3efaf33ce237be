"""Axolotl's own example configs validate unchanged, or are refused in one
message that names every capability Plait lacks; never a traceback.

The configs live in ``../shared/axolotl-examples/configs`` (half of Axolotl's
examples at commit 067b021); the test skips where that folder is absent.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
from pathlib import Path

import pytest

#: ``../shared`` beside the checkout (a worktree one level deeper looks one further up)
_CANDIDATES = [Path(__file__).resolve().parents[n] / "shared" / "axolotl-examples" / "configs" for n in (2, 3)]
EXAMPLES = next((path for path in _CANDIDATES if path.is_dir()), _CANDIDATES[0])

#: share of the examples that must validate unchanged. Measured 119/132 (90.2%)
#: with every plugin of this repository installed; validate runs the pre-flight
#: too. The rest are refused by name: online RL (GRPO, GDPO, EBFT, NeMo Gym),
#: diffusion LM training, expert parallelism, Axolotl's DeepSeek-V4 / GLM-DSA /
#: NVFP4 kernels, a key current Axolotl refuses itself
#: (max_packed_sequence_len) and a pattern that trains nothing under an adapter.
#: The issue's target is 0.9.
PASS_FLOOR = 0.9


def _configs() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yml", ".yaml"))


def _validate(path: Path) -> tuple[object, str]:
    from plait import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["config", "validate", str(path)])
    return code, err.getvalue()


def _groups(message: str) -> dict[str, list[str]]:
    """Problem lines of a grouped message by heading (notes left out)."""
    groups, heading = {}, None
    for line in message.splitlines():
        if line.startswith("  - "):
            groups.setdefault(heading, []).append(line[4:])
        elif not line.startswith(" "):
            heading = line.rstrip(":")
    groups.pop("notes", None)
    return groups


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="no ../shared/axolotl-examples/configs here")
def test_axolotl_examples_validate_or_name_what_is_missing():
    results = {path: _validate(path) for path in _configs()}
    tracebacks = {str(p): err[-300:] for p, (code, err) in results.items() if code not in (0, 2)}
    assert not tracebacks, tracebacks
    passed = [p for p, (code, _) in results.items() if code == 0]
    # every key of Axolotl's examples is known: implemented, a no-op, or refused by name
    unknown = {str(p.relative_to(EXAMPLES)): _groups(err).get("unknown keys")
               for p, (code, err) in results.items() if code == 2 and _groups(err).get("unknown keys")}
    assert not unknown, unknown
    rate = len(passed) / len(results)
    assert rate >= PASS_FLOOR, f"{len(passed)}/{len(results)} validate unchanged"


def test_first_party_plugin_keys_match_their_schemas():
    """The keys listed for first-party plugins that may be absent must be keys
    their schema declares wherever the plugin is installed (no drift)."""
    from plait.config.plugin_keys import FIRST_PARTY_KEYS

    checked = 0
    by_dist = {}
    for ep in importlib.metadata.entry_points(group="plait"):
        if ep.dist is not None:
            by_dist.setdefault(ep.dist.name, []).append(ep)
    for dist, keys in FIRST_PARTY_KEYS.items():
        for ep in by_dist.get(dist, []):
            declared = set(ep.load().config_schema().model_fields)
            assert set(keys) <= declared, (dist, set(keys) - declared)
            checked += 1
    if not checked:
        pytest.skip("none of " + ", ".join(FIRST_PARTY_KEYS) + " is installed here")
