"""Sweep every causal-LM architecture of the installed transformers through Plait.

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny
random model and run :mod:`plait.conformance`'s checks (logits, LoRA, full,
packing) on the CPU, each model in its own forked process with a timeout, so
one hang or crash does not stop the sweep. Results go to a JSON file; with
``--matrix`` the support matrix (``docs/models.md`` and the copy ``plait
models`` prints) is regenerated from them.

    nice .venv/bin/python bench/architectures.py --jobs 1 --out bench/architectures.json --matrix
    .venv/bin/python bench/architectures.py --only llama,gpt2,opt --out /tmp/some.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _child(model_type: str, work: str, tokenizer_dir: str, result_path: str) -> None:
    import io
    import contextlib
    import logging

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    from plait.conformance import check_architecture

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = check_architecture(model_type, work, tokenizer_dir=tokenizer_dir)
    Path(result_path).write_text(json.dumps(result))


def sweep(types: list[str], jobs: int, timeout: float, out: Path, earlier: dict | None = None) -> list[dict]:
    # imported once in the parent, so each forked child starts warm
    import importlib

    import torch  # noqa: F401
    import transformers  # noqa: F401

    import plait.conformance  # noqa: F401
    for name in ("peft", "datasets", "matplotlib.pyplot", "plait.train.loop", "plait.commands.merge_lora",
                 "plait_peft", "plait_models", "plait_formats", "plait_kernels"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from plait.testing import make_tiny_tokenizer

    ctx = multiprocessing.get_context("fork")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="plait-arch-") as tmp:
        tokenizer_dir = str(make_tiny_tokenizer(Path(tmp) / "tokenizer"))
        pending = list(types)
        running: dict[str, tuple] = {}
        while pending or running:
            while pending and len(running) < jobs:
                model_type = pending.pop(0)
                work = Path(tmp) / model_type
                work.mkdir()
                result_path = str(work / "result.json")
                proc = ctx.Process(target=_child, args=(model_type, str(work), tokenizer_dir, result_path))
                proc.start()
                running[model_type] = (proc, time.monotonic(), result_path)
            time.sleep(0.2)
            for model_type, (proc, started, result_path) in list(running.items()):
                elapsed = time.monotonic() - started
                if proc.is_alive() and elapsed < timeout:
                    continue
                if proc.is_alive():
                    proc.kill()
                proc.join()
                del running[model_type]
                if os.path.exists(result_path):
                    result = json.loads(Path(result_path).read_text())
                else:
                    why = f"timed out after {timeout:.0f} s" if elapsed >= timeout else f"exit code {proc.exitcode}"
                    result = {"model_type": model_type, "crashed": why}
                result["seconds"] = round(elapsed, 1)
                results[model_type] = result
                print(f"{model_type:28s} {summary_line(result)}", flush=True)
                # rewritten after every model: a long sweep can be read (or resumed) midway
                out.write_text(json.dumps(sorted_results({**(earlier or {}), **results}, model_types()), indent=1))
                import shutil

                shutil.rmtree(Path(tmp) / model_type, ignore_errors=True)
    return sorted_results(results, types)


def sorted_results(results: dict, order: list[str]) -> list[dict]:
    return [results[t] for t in order if t in results]


CHECK_NAMES = ("logits", "lora", "full", "packing")


def summary_line(result: dict) -> str:
    if "crashed" in result:
        return f"CRASHED ({result['crashed']})"
    parts = [f"built={result['built']['status']}"]
    parts += [f"{name}={result[name]['status']}" for name in CHECK_NAMES if name in result]
    return " ".join(parts) + f" ({result.get('seconds', '?')} s)"


def counts(results: list[dict]) -> dict:
    """The report's numbers: built / per check passed / refused with a message / tracebacks."""
    built = [r for r in results if r.get("built", {}).get("status") == "pass"]
    out = {"model_types": len(results), "built": len(built)}
    for name in CHECK_NAMES:
        out[name] = sum(r.get(name, {}).get("status") == "pass" for r in built)
    out["lora+full+packing+logits"] = sum(all(r.get(n, {}).get("status") == "pass" for n in CHECK_NAMES)
                                          for r in built)
    out["refused_with_message"] = sum(any(r.get(n, {}).get("status") == "refused" for n in CHECK_NAMES)
                                      for r in built)
    out["mismatch"] = sum(any(r.get(n, {}).get("status") == "mismatch" for n in CHECK_NAMES) for r in built)
    out["traceback"] = sum(any(r.get(n, {}).get("status") == "error" for n in CHECK_NAMES) or "crashed" in r
                           for r in results if r.get("built", {}).get("status") == "pass" or "crashed" in r)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="models checked at once (default 1)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model before it is killed")
    parser.add_argument("--out", type=Path, default=Path("architectures.json"), help="results JSON")
    parser.add_argument("--update", action="store_true",
                        help="keep the other model types' results already in --out (rerun a few, or resume)")
    parser.add_argument("--skip-done", action="store_true",
                        help="with --update: only the model types --out has no result for")
    parser.add_argument("--matrix", action="store_true",
                        help="regenerate docs/models.md and plait-models' support_matrix.json from the results")
    args = parser.parse_args(argv)
    types = model_types()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in types]
        if unknown:
            parser.error(f"--only: {unknown} are not causal-LM model types of transformers "
                         f"({len(types)} known, e.g. {types[:5]})")
        types = wanted
    earlier = {}
    if args.update and args.out.exists():
        earlier = {r["model_type"]: r for r in json.loads(args.out.read_text())}
        if args.skip_done:
            types = [t for t in types if t not in earlier]
    fresh = sweep(types, max(1, args.jobs), args.timeout, args.out, earlier)
    results = sorted_results({**earlier, **{r["model_type"]: r for r in fresh}}, model_types())
    print(json.dumps(counts(results), indent=1))
    if args.matrix:
        sys.path.insert(0, str(REPO / "plugins" / "plait-models"))
        from plait_models.support import write_matrix

        write_matrix(results, REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
