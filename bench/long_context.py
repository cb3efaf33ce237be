"""Long context: 8B LoRA / QLoRA tokens/s and peak memory at long sequences, Plait against
Unsloth, and the longest sequence each trains without running out of memory.

One GPU, from the repository root (``throughput.py``'s workers, model and runner):

    python3 bench/long_context.py --seqs 16384      # LoRA + QLoRA, Plait and Unsloth: ~6 min on an H100
    python3 bench/long_context.py --seqs 32768      # ~7.5 min (both lengths in one command pass 10 minutes)
    python3 bench/long_context.py --seqs none --max-seq-search --search-start 131072 \
        --search-budget-s 210 --probe-timeout-s 210   # one 128k probe per case: ~8.5 min
    .venv/bin/python bench/long_context.py --smoke --max-seq-search   # tiny model on the CPU, ~3-5 minutes

Part 1, throughput: for every length of ``--seqs`` (default 16384,32768) and every case of
``--cases`` (default ``plait[gradient_checkpointing=offload]``, ``unsloth``,
``plait[adapter=qlora,load_in_4bit=true,gradient_checkpointing=offload]``,
``unsloth[load_in_4bit=true]``: both offload the checkpointed activations), one process trains micro batch 1 of that many random tokens:
``--warmup`` (2) untimed steps, then ``--steps`` (3) timed ones. The cases are
``throughput.py``'s (same random-init Llama, LoRA r=16 alpha=32 on every linear layer, same
optimizer; ``plait[key=value,...]`` adds Plait keys; ``unsloth[load_in_4bit=true]`` is
Unsloth's QLoRA). Reported per case: tokens/s, seconds a step, peak GiB
(``torch.cuda.max_memory_allocated``), the time from process start to the end of step 1, and
tokens/s against the Unsloth case of the same length and quantization.

Part 2, ``--max-seq-search``: for every case of ``--search-cases`` (default
``plait[gradient_checkpointing=offload]`` and ``unsloth``, both offloading their checkpointed
activations to the host) the longest sequence that trains one step without running out of
GPU memory. Each probe is one short process (load, one optimizer step at micro batch 1,
exit) killed after ``--probe-timeout-s`` (180); probes start at ``--search-start`` (65536)
and double until one fails, then bisect between the longest that passed and the shortest
that failed, in multiples of 1024, until the two are within 1/16 of each other, the
length reaches ``--search-max`` (262144), or the rest of ``--search-budget-s`` (240) is
shorter than the next probe would take (the last probe's time scaled by the length).
Only an out-of-memory error counts as "does not fit"; a probe that runs past its timeout
ends the search with the length unknown (too slow to tell within the budget), and any other
error is reported as such. The reason of the first failure (the allocation that did not
fit) is printed, which says what limits the maximum.

Each command must stay under the device's 10 minutes: a probe at 128k tokens of the 8B
takes one to two minutes (load, Unsloth's import, one step whose attention grows with the
square of the length), so a budget of 240 s covers about three probes per case.

With ``$OUT`` set (or ``--out DIR``): ``long_context_<shape>.json`` / ``.md`` and every
worker's log there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (shapes, prepare worker, plait/unsloth workers, process runner)

THROUGHPUT_SCRIPT = Path(throughput.__file__).resolve()
#: Plait offloads its checkpointed layer inputs to the host as Unsloth's "unsloth" checkpointing does
DEFAULT_CASES = ("plait[gradient_checkpointing=offload],unsloth,"
                 "plait[adapter=qlora,load_in_4bit=true,gradient_checkpointing=offload],unsloth[load_in_4bit=true]")
DEFAULT_SEARCH_CASES = "plait[gradient_checkpointing=offload],unsloth"
#: probe lengths are multiples of this (smoke: 16)
GRANULE = 1024


def write_rows(path: Path, rows: int, seq: int, vocab: int, seed: int = 0) -> None:
    """``rows`` random-token rows of exactly ``seq`` tokens (ids after the tokenizer's specials)."""
    rng = random.Random(seed)
    low = len(throughput.SPECIALS)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"input_ids": [rng.randrange(low, vocab) for _ in range(seq)]}) + "\n")


def label_of(name: str, keys: dict) -> str:
    return name + (f"[{','.join(f'{k}={v}' for k, v in keys.items())}]" if keys else "")


def is_oom(result: dict) -> bool:
    text = result.get("error", "").lower()
    return "out of memory" in text or "outofmemory" in text


def search_max_seq(probe, start: int, cap: int, granule: int, budget_s: float, min_probe_s: float = 30.0,
                   clock=time.perf_counter) -> dict:
    """The longest length ``probe(seq, timeout_s)`` passes: doubling from ``start`` until a
    failure (halving first if ``start`` fails), then bisecting, lengths in multiples of
    ``granule``. ``probe`` returns a text starting with ``"pass"`` or ``"oom"`` (details may
    follow), ``"timeout"``, or an error text.
    Stops when the bounds are within 1/16 of the passing one (or one granule), at ``cap``,
    or when the budget has less left than the next probe needs (``min_probe_s``, or the
    last probe's time scaled by the length). Returns the bounds, why it
    stopped and every probe."""
    began = clock()
    passed, failed, probes, stop = None, None, [], None
    seq = start
    while True:
        left = budget_s - (clock() - began)
        # a longer probe takes at least proportionally longer (the load is fixed, attention grows faster)
        expected = probes[-1]["s"] * seq / probes[-1]["seq"] if probes and seq > probes[-1]["seq"] else min_probe_s
        if left < max(min_probe_s, expected):
            stop = f"budget: {left:.0f}s left, a probe at {seq} needs about {expected:.0f}s"
            break
        t0 = clock()
        outcome = probe(seq, left)
        probes.append({"seq": seq, "outcome": outcome, "s": clock() - t0})
        if outcome.startswith("pass"):
            passed = seq
        elif outcome.startswith("oom"):
            failed = seq
        else:
            stop = f"probe at {seq}: {outcome}"
            break
        if failed is None:
            if seq >= cap:
                stop = f"reached --search-max {cap}"
                break
            seq = min(cap, seq * 2)
            continue
        if passed is None:
            if seq <= granule:
                stop = "even the shortest probe ran out of memory"
                break
            seq = max(granule, seq // 2 // granule * granule)
            continue
        if failed - passed <= max(granule, passed // 16):
            stop = "bounds within 1/16"
            break
        seq = (passed + failed) // 2 // granule * granule
        if seq in (passed, failed):
            stop = "bounds one granule apart"
            break
    return {"max_passed": passed, "min_failed": failed, "stopped": stop, "probes": probes,
            "search_s": clock() - began}


def check_search_logic() -> None:
    """The search against a known limit (no model): it must bracket the limit within 1/16."""
    for limit in (70000, 131072, 300000, 5000):
        outcome = search_max_seq(lambda seq, _left: "pass" if seq <= limit else "oom", 65536, 262144, 1024,
                                 budget_s=1e9, clock=iter(range(10**6)).__next__)
        passed, failed = outcome["max_passed"], outcome["min_failed"]
        if limit >= 262144:
            assert passed == 262144 and failed is None, (limit, outcome)
        else:
            assert passed is not None and passed <= limit < failed and failed - passed <= max(1024, passed // 16), \
                (limit, outcome)


def table(results: list[dict], meta: dict) -> str:
    head = "| shape | seq | case | tokens/s | s/step | peak GiB | first step s | final loss | vs unsloth |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        first = f"| {meta['shape']} | {r['seq']} | {r['case']} |"
        if "tokens_per_s" not in r:
            rows.append(first + f" failed: {r.get('error', '?')[:120]} |" + " |" * 5)
            continue
        base = next((b for b in results if b["seq"] == r["seq"] and b["name"] == "unsloth"
                     and b["quantized"] == r["quantized"] and "tokens_per_s" in b), None)
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "n/a (CPU)"
        first_step = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else ""
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else ""
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        rows.append(first + f" {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {peak} | {first_step} | {loss} | "
                            f"{ratio} |")
    return "\n".join(rows)


def search_table(searches: list[dict]) -> str:
    rows = ["| case | longest that trained | shortest out of memory | stopped | probes (seq: outcome, s) |",
            "|---|---|---|---|---|"]
    for s in searches:
        probes = "; ".join(f"{p['seq']}: {p['outcome'][:60]}, {p['s']:.0f}" for p in s["probes"])
        rows.append(f"| {s['case']} | {s['max_passed'] or 'none'} | {s['min_failed'] or 'not reached'} | "
                    f"{s['stopped']} | {probes} |")
    for s in searches:
        if s.get("limit"):
            rows.append(f"\n{s['case']}: the first out-of-memory probe ended with: {s['limit']}")
    return "\n".join(rows)


def main() -> int:
    throughput.process_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--shape", choices=["1b", "8b"], default="8b")
    parser.add_argument("--seqs", default=None,
                        help="comma-separated lengths for the throughput part, or 'none' (default 16384,32768; "
                             "smoke 64)")
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="throughput cases: plait, unsloth; plait[key=value,...] adds Plait keys; "
                             f"unsloth[load_in_4bit=true] (default {DEFAULT_CASES})")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3; smoke 2)")
    parser.add_argument("--case-timeout", type=float, default=240, help="seconds before a throughput case is killed")
    parser.add_argument("--max-seq-search", action="store_true", help="also search the longest trainable sequence")
    parser.add_argument("--search-cases", default=DEFAULT_SEARCH_CASES,
                        help=f"cases of the search (default {DEFAULT_SEARCH_CASES})")
    parser.add_argument("--search-start", type=int, default=None, help="first probe (default 65536; smoke 64)")
    parser.add_argument("--search-max", type=int, default=None,
                        help="longest probe; the model's max_position_embeddings (default 262144; smoke 128)")
    parser.add_argument("--search-budget-s", type=float, default=240, help="seconds of probes per search case")
    parser.add_argument("--probe-timeout-s", type=float, default=180, help="seconds before one probe is killed")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (Unsloth cases left out)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the results (default $OUT)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model/data directory")
    args = parser.parse_args()

    shape = "smoke" if args.smoke else args.shape
    seqs = [] if args.seqs == "none" else [int(s) for s in (args.seqs or ("64" if args.smoke else
                                                                          "16384,32768")).split(",")]
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 3)
    granule = 16 if args.smoke else GRANULE
    start = args.search_start or (64 if args.smoke else 65536)
    cap = args.search_max or (128 if args.smoke else 262144)
    if warmup < 1 or steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if start % granule or cap < start:
        parser.error(f"--search-start must be a multiple of {granule} and at most --search-max")

    def parse(text: str, option: str) -> list[tuple[str, dict]]:
        try:
            cases = [throughput.parse_case(spec) for spec in throughput.split_cases(text)]
        except ValueError as exc:
            parser.error(f"{option}: {exc}")
        if bad := [name for name, _ in cases if name not in ("plait", "unsloth")]:
            parser.error(f"{option}: {bad} unknown; accepted: plait, unsloth")
        if bad := [key for name, keys in cases if name == "unsloth" for key in keys if key != "load_in_4bit"]:
            parser.error(f"{option}: unsloth[...] takes load_in_4bit only, not {bad}")
        if args.smoke and any(name == "unsloth" for name, _ in cases):
            print(f"--smoke: the unsloth cases of {option} are left out (Unsloth needs CUDA)", flush=True)
            cases = [(name, keys) for name, keys in cases if name != "unsloth"]
        return cases

    cases, search_cases = parse(args.cases, "--cases"), parse(args.search_cases, "--search-cases")
    check_search_logic()

    vocab = throughput.SHAPES[shape]["vocab_size"]
    longest = max(seqs + ([cap] if args.max_seq_search else []) or [4096])
    meta = {"shape": shape, "dims": throughput.SHAPES[shape], "micro_batch": 1, "seqs": seqs, "warmup_steps": warmup,
            "timed_steps": steps, "lora": {"r": throughput.LORA_R, "alpha": throughput.LORA_ALPHA},
            "max_position_embeddings": max(4096, longest),
            "search": {"start": start, "max": cap, "budget_s": args.search_budget_s,
                       "probe_timeout_s": args.probe_timeout_s} if args.max_seq_search else None}
    out = Path(args.out) if args.out else None
    args.stem = f"long_context_{shape}"
    work = Path(tempfile.mkdtemp(prefix=f"plait_{args.stem}_", dir="/tmp" if os.path.isdir("/tmp") else None))
    log_dir = out if out else work
    log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    results: list[dict] = []
    searches: list[dict] = []

    def write() -> str:
        text = table(results, meta) + ("\n\n" + search_table(searches) if searches else "")
        if out:
            (out / f"{args.stem}.json").write_text(json.dumps({"meta": meta, "results": results,
                                                               "searches": searches}, indent=2))
            (out / f"{args.stem}.md").write_text(text + "\n")
        return text

    def worker_args(seq: int, data: Path, case_dir: Path, keys: dict, warm: int, timed: int) -> list[str]:
        return ["--worker-shape", shape, "--mode", "lora", "--lengths", "fixed", "--seq", str(seq), "--micro-batch",
                "1", "--warmup", str(warm), "--steps", str(timed), "--model-dir", str(model_dir), "--data", str(data),
                "--work-dir", str(case_dir), "--case-keys", json.dumps(keys)]

    try:
        # the model once, its max_position_embeddings the longest length asked for (no rope scaling anywhere)
        prep = throughput.run_worker("prepare", ["--worker-shape", shape, "--mode", "lora", "--seq", str(longest),
                                                 "--rows", "1", "--model-dir", str(model_dir), "--data",
                                                 str(work / "unused.jsonl"), "--work-dir", str(work)],
                                     args, log_dir, 600, script=THROUGHPUT_SCRIPT)
        if "error" in prep:
            return 1
        (work / "unused.jsonl").unlink(missing_ok=True)
        meta.update({k: prep[k] for k in ("device", "versions", "prepare_s")})
        print(f"device {prep['device']}; model prepared in {prep['prepare_s']:.0f}s", flush=True)

        index = 0
        for seq in seqs:
            data = work / f"rows_{seq}.jsonl"
            write_rows(data, warmup + steps, seq, vocab)
            for name, keys in cases:
                case_dir = work / f"case{index}"
                case_dir.mkdir()
                result = throughput.run_worker(name, worker_args(seq, data, case_dir, keys, warmup, steps), args,
                                               log_dir, args.case_timeout, log_name=f"{index}_{seq}_{name}",
                                               script=THROUGHPUT_SCRIPT)
                result.update({"case": label_of(name, keys), "name": name, "seq": seq,
                               "quantized": bool(keys.get("load_in_4bit"))})
                results.append(result)
                index += 1
                write()

        for name, keys in search_cases if args.max_seq_search else []:
            label, first_oom = label_of(name, keys), {}

            def probe(seq: int, left: float) -> str:
                nonlocal index
                data = work / f"probe_{seq}.jsonl"
                if not data.exists():
                    write_rows(data, 1, seq, vocab)
                case_dir = work / f"probe{index}"
                case_dir.mkdir()
                result = throughput.run_worker(name, worker_args(seq, data, case_dir, keys, 1, 0), args, log_dir,
                                               min(args.probe_timeout_s, left), log_name=f"probe{index}_{seq}_{name}",
                                               script=THROUGHPUT_SCRIPT)
                index += 1
                shutil.rmtree(case_dir, ignore_errors=True)
                if "error" not in result:
                    peak = result.get("peak_gib")
                    return "pass" + (f" ({peak:.1f} GiB)" if peak is not None else "")
                if result.get("timed_out"):
                    return "timeout"
                if is_oom(result):
                    first_oom.setdefault("text", result["error"][-300:])
                    return "oom"
                return f"error: {result['error'][-200:]}"

            found = search_max_seq(probe, start, cap, granule, args.search_budget_s)
            searches.append({"case": label, **found, "limit": first_oom.get("text")})
            print(f"[search {label}] longest that trained: {found['max_passed']}, shortest out of memory: "
                  f"{found['min_failed']} ({found['stopped']})", flush=True)
            write()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(write())
    if out:
        print(f"wrote {out / (args.stem + '.json')} and {out / (args.stem + '.md')}")
    failed = [r for r in results if "error" in r] + [s for s in searches if str(s["stopped"]).startswith("probe")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
