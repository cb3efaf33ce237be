"""Write the generated pages of the documentation site.

``make docs`` runs this, then ``mkdocs build --strict``. Everything written
here is derived from the code (schemas, hookspecs, error classes, the Axolotl
key tables), from the benchmark results, or from running ``plait inspect``,
so the site cannot drift from what the installed packages do. The outputs
are not committed (``docs/reference/``, ``docs/generated/`` in .gitignore).

    python docs/gen/build_pages.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
ROOT = DOCS.parent
sys.path.insert(0, str(HERE))

import axolotl_tables  # noqa: E402
import config_reference  # noqa: E402
import errors_table  # noqa: E402
import hooks_reference  # noqa: E402
import inspect_output  # noqa: E402
import results_tables  # noqa: E402


def examples_table() -> str:
    """Name, purpose and the keys that make each example what it is."""
    import yaml

    from plait.commands.examples import available, summary

    telling = ("adapter", "load_in_4bit", "sample_packing", "fsdp", "tensor_parallel_size", "context_parallel_size",
               "lora_target_experts", "gradient_checkpointing", "chat_template")
    lines = ["| example | what it is | keys to look at |", "|---|---|---|"]
    for name, path in available().items():
        raw = yaml.safe_load(path.read_text())
        keys = ", ".join(f"`{k}: {str(raw[k]).lower() if isinstance(raw[k], bool) else raw[k]}`"
                         for k in telling if k in raw)
        lines.append(f"| `{name}` | {summary(path)} | {keys} |")
    return "\n".join(lines)


def main() -> int:
    from plait.plugins import build_plugin_manager

    pm = build_plugin_manager()
    reference, generated = DOCS / "reference", DOCS / "generated"
    reference.mkdir(exist_ok=True)
    generated.mkdir(exist_ok=True)
    (reference / "config.md").write_text(config_reference.render(pm))
    (reference / "hooks.md").write_text(hooks_reference.render())
    (generated / "axolotl-refused.md").write_text(axolotl_tables.refused() + "\n")
    (generated / "axolotl-plugins.md").write_text(axolotl_tables.needs_plugin(pm) + "\n")
    (generated / "axolotl-renamed.md").write_text(axolotl_tables.renamed() + "\n")
    (generated / "axolotl-deepspeed.md").write_text(axolotl_tables.deepspeed() + "\n")
    (generated / "axolotl-no-effect.md").write_text(axolotl_tables.no_effect(pm) + "\n")
    (generated / "errors.md").write_text(errors_table.render() + "\n")
    (generated / "examples.md").write_text(examples_table() + "\n")
    results_tables.generate(ROOT, generated)
    inspect_output.generate(generated)
    print(f"wrote {reference} and {generated}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
