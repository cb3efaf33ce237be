"""The support matrix: which architectures fine-tune in Plait, and how well.

``support_matrix.json`` (beside this module) holds the result of the last full
sweep (``bench/architectures.py --matrix``): per transformers ``model_type``,
the status of each check of :mod:`plait.conformance`. :func:`write_matrix`
writes it and ``docs/models.md``; ``plait models`` (:func:`add_models_command`)
prints it with what each family adds (kernel swaps, a tensor-parallel plan).
"""

from __future__ import annotations

import json
from pathlib import Path

MATRIX_FILE = Path(__file__).with_name("support_matrix.json")
CHECKS = ("lora", "full", "packing", "logits")
#: how a check's status reads in the matrix
MARKS = {"pass": "yes", "refused": "refused", "mismatch": "MISMATCH", "error": "ERROR", None: "-"}
#: in a packing pass's detail: the model's recurrent layers run one packed row at a time
#: (``plait.conformance.PER_ROW_NOTE``; spelt out here so the matrix reads old results without core)
PER_ROW = "recurrent layers run one packed row at a time"
REGENERATE = "nice .venv/bin/python bench/architectures.py --jobs 1 --out bench/architectures.json --matrix"


def _without_sweep_paths(check: dict) -> dict:
    """``check`` with the sweep's temporary directories cut out of its detail."""
    import re

    return {**check, "detail": re.sub(r"/\S*?plait-arch-[^/\s']*/", "", check.get("detail", ""))}


def summarize(result: dict) -> dict:
    """One matrix row from one sweep result (``plait.conformance.check_architecture``)."""
    result = {k: _without_sweep_paths(v) if isinstance(v, dict) else v for k, v in result.items()}
    row = {"model_type": result["model_type"]}
    if "crashed" in result:
        row["built"] = {"status": "error", "detail": result["crashed"]}
        return row
    row["built"] = result["built"]
    for name in CHECKS:
        if name in result:
            row[name] = result[name]
    logits = result.get("logits", {})
    row["loss_path"] = ("model logits" if "model's own logits" in logits.get("detail", "")
                        else "fused head" if logits.get("status") == "pass" else "-")
    return row


def write_matrix(results: list[dict], repo: Path) -> None:
    """Write ``support_matrix.json`` and ``docs/models.md`` from a sweep's results."""
    import platform

    import torch
    import transformers

    matrix = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
              "python": platform.python_version(), "rows": [summarize(r) for r in results]}
    MATRIX_FILE.write_text(json.dumps(matrix, indent=1) + "\n")
    docs = Path(repo) / "docs" / "models.md"
    docs.parent.mkdir(exist_ok=True)
    docs.write_text(render_markdown(matrix, family_facts()))


def load_matrix() -> dict:
    """The stored matrix (empty rows when none was generated)."""
    try:
        return json.loads(MATRIX_FILE.read_text())
    except (OSError, ValueError):
        return {"transformers": "?", "rows": []}


def family_facts(pm=None) -> dict:
    """``{model_type: (family name, kernels swapped, has a TP plan)}`` from the
    installed families (plait-models' own when ``pm`` is ``None``)."""
    from plait.families import all_families

    if pm is None:
        from plait_models.families import FAMILIES

        families = list(FAMILIES)
    else:
        families = all_families(pm)
    facts = {}
    for family in families:
        kernels = ", ".join(k for k, cls in (("RMSNorm", family.norm_class), ("MLP", family.mlp_class)) if cls)
        for model_type in family.model_types:
            facts.setdefault(model_type, (family.name, kernels or "-", bool(family.tp_plan)))
    return facts


def counts(rows: list[dict]) -> dict:
    built = [r for r in rows if r.get("built", {}).get("status") == "pass"]
    passed = {name: sum(r.get(name, {}).get("status") == "pass" for r in built) for name in CHECKS}
    every = sum(all(r.get(n, {}).get("status") == "pass" for n in ("lora", "full", "packing", "logits"))
                for r in built)
    trains = sum(all(r.get(n, {}).get("status") == "pass" for n in ("lora", "full", "logits")) for r in built)
    refused = sum(any(r.get(n, {}).get("status") == "refused" for n in CHECKS) for r in built)
    broken = sum(any(r.get(n, {}).get("status") in ("error", "mismatch") for n in CHECKS) for r in built)
    return {"types": len(rows), "built": len(built), **passed, "all": every, "trains": trains,
            "refused": refused, "broken": broken}


def _cell(row: dict, name: str) -> str:
    check = row.get(name, {})
    if name == "packing" and check.get("status") == "pass" and PER_ROW in check.get("detail", ""):
        return "yes, per row*"  # its recurrent layers run one packed row at a time (see the note under the table)
    return MARKS.get(check.get("status"), "?")


def table_rows(matrix: dict, facts: dict) -> list[list[str]]:
    """``[architecture, family, LoRA, full, packing, loss input, kernels, TP plan]`` per model type."""
    out = []
    for row in matrix["rows"]:
        family, kernels, tp = facts.get(row["model_type"], ("generic", "-", False))
        if row.get("built", {}).get("status") != "pass":
            out.append([row["model_type"], family, "not built", "", "", "", kernels, "yes" if tp else "-"])
            continue
        out.append([row["model_type"], family, _cell(row, "lora"), _cell(row, "full"), _cell(row, "packing"),
                    row.get("loss_path", "-") if _cell(row, "logits") == "yes" else _cell(row, "logits"),
                    kernels, "yes" if tp else "-"])
    return out


#: mismatches the sweep found that reproduce without Plait (checked by hand with
#: transformers 5.25.0 and peft 0.21.2); kept beside the matrix so nobody chases them in Plait
UPSTREAM = {
    "youtu": "plain transformers: save_pretrained then from_pretrained gives back the initial tied embeddings, "
             "not the saved ones",
    "laguna": "plain peft: an adapter on every linear layer saved and reloaded gives other logits",
    "inkling2_text": "plain peft: an adapter on every linear layer saved and reloaded gives other logits",
    "inkling2_loop_text": "plain peft: an adapter on every linear layer saved and reloaded gives other logits",
}

HEADER = ["architecture", "family", "LoRA", "full", "packing", "loss input", "kernels swapped", "TP plan"]


def render_markdown(matrix: dict, facts: dict) -> str:
    n = counts(matrix["rows"])
    lines = [
        "# Supported architectures",
        "",
        "Every causal-LM `model_type` of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, swept on the CPU with a",
        "tiny random model through Plait's real pipeline (`plait.conformance`): LoRA on every linear layer",
        "(`lora_target_linear`) trains, reloads in peft and merges with `plait merge-lora`; full fine-tuning trains",
        "and reloads; sample packing gives exactly the loss of the rows run alone; and Plait's loss input gives the",
        "loss of the model's own logits.",
        "",
        f"Tested with transformers {matrix.get('transformers', '?')}, torch {matrix.get('torch', '?')}. "
        f"Regenerate with `{REGENERATE}`; `plait models` prints this table.",
        "",
        f"{n['types']} model types: {n['built']} build as tiny models; of those, LoRA {n['lora']}, full "
        f"{n['full']}, packing {n['packing']} (packing refused with a message: see below), logits equal "
        f"{n['logits']}; LoRA + full + packing + logits all pass for {n['all']}; {n['broken']} end in an error "
        "or a mismatch.",
        "",
        "Columns: *yes* passed; *refused* Plait declines with a message naming why (packing of models whose",
        "recurrent state, convolutions or pooled keys cross packed rows, models with no way to take per-row",
        "positions, Falcon's ALiBi); *yes, per row\\** packing is exact, but the model's recurrent or convolutional",
        "layers (Mamba mixers, gated delta nets, short convolutions, linear attention) run one packed row at a",
        "time, right-padded to the longest row of the batch, so packing saves less there than for attention;",
        "*loss input* is *fused head* where Plait computes the loss from the backbone's hidden states and the head",
        "weight (fused loss kernels apply) and *model logits* where the model scales or caps its logits and Plait",
        "uses them as they are. *kernels swapped* and *TP plan* come from the model's family (plait-models);",
        "*generic* types train without them. BERT-style causal LMs (bert, roberta, electra, ...) load with",
        "`is_decoder: true`, so they attend causally (their checkpoints say false and would attend both ways);",
        "load the base model with `is_decoder=True` to use an adapter trained on one outside Plait.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(matrix, facts)]
    notes = [(row["model_type"], name, row[name]["status"], row[name]["detail"]) for row in matrix["rows"]
             for name in ("built",) + CHECKS if row.get(name, {}).get("status") not in (None, "pass")]
    if notes:
        lines += ["", "## Why not", ""]
        lines += [f"- `{t}` {name}: {status}: {detail}"
                  + (f" (upstream, reproduced without Plait: {UPSTREAM[t]})" if status == "mismatch" and t in UPSTREAM
                     else "") for t, name, status, detail in notes]
    return "\n".join(lines) + "\n"


def add_models_command(subparsers) -> None:
    parser = subparsers.add_parser("models", help="the support matrix: which architectures fine-tune, and how")
    parser.add_argument("--json", action="store_true", help="print the stored matrix as JSON")
    parser.add_argument("model_types", nargs="*", metavar="MODEL_TYPE", help="only these model types")
    parser.set_defaults(func=run_models_command)


def run_models_command(args, pm) -> int:
    from plait.errors import PlaitError

    matrix = load_matrix()
    rows = matrix["rows"]
    if args.model_types:
        known = {r["model_type"] for r in rows}
        unknown = [t for t in args.model_types if t not in known]
        if unknown:
            raise PlaitError(f"model types {unknown} are not in the support matrix (transformers "
                             f"{matrix.get('transformers')}); a model type it lacks goes through the generic path "
                             f"untested; regenerate with: {REGENERATE}")
        rows = [r for r in rows if r["model_type"] in args.model_types]
    if args.json:
        print(json.dumps({**matrix, "rows": rows}, indent=1))
        return 0
    cells = table_rows({**matrix, "rows": rows}, family_facts(pm))
    widths = [max(len(str(c)) for c in column) for column in zip(HEADER, *cells)]
    for line in [HEADER, *cells]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    n = counts(matrix["rows"])
    print(f"\ntransformers {matrix.get('transformers')}: {n['built']} of {n['types']} types built; LoRA {n['lora']}, "
          f"full {n['full']}, packing {n['packing']}, logits equal {n['logits']}; all four {n['all']}")
    return 0
