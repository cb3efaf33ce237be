"""Generation during evaluation: Axolotl's ``do_causal_lm_eval`` and ``eval_table_size``.

Each eval row is split where training starts::

    input_ids  [bos  You  are  ...  Response:  The  answer  is  4  eos]
    labels     [-100 -100 -100 ... -100        The  answer  is  4  eos]
               |------------- prompt -------|  |---- reference -----|

The prompt is every token before the first trained one; the reference is the
trained span that follows it (up to the next untrained token, so a
multi-turn row is scored on its first answer, the one the prompt asks for).
Rows with no untrained prefix (``train_on_inputs``, completion data) or no
trained token have nothing to compare and are left out, and the run says how
many. The model completes each prompt greedily (``eval_max_new_tokens``,
stopping at its generation config's EOS ids, the tokenizer's EOS and
``eot_tokens``), in batches of ``eval_batch_size`` left-padded prompts, in
eval mode under ``no_grad``; training mode is restored after.

``do_causal_lm_eval`` scores the completions of every eligible row with
``eval_causal_lm_metrics``: ``sacrebleu``, ``ter`` and ``chrf`` are the
sacrebleu package's corpus scores (the defaults of its ``corpus_bleu``,
``corpus_ter`` and ``corpus_chrf``, which Hugging Face ``evaluate`` wraps
for Axolotl), ``perplexity`` the model's on the reference tokens alone
(BOS first where the tokenizer has one), as Axolotl's ``Perplexity`` scores
the reference texts. ``eval_table_size`` keeps the first N eligible rows'
prompt, reference and prediction for ``eval_predictions.jsonl`` and the
trackers that take tables (``on_eval_predictions``).

Several processes replicating the model (DDP): every rank generates a slice
of the rows on its unwrapped model, and rank 0 gathers them. A sharded model
(FSDP, tensor or context parallel) is refused when the config is validated
(plait-parallel) and again here, since ranks would have to generate in lockstep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# ACCEPTED_METRICS: Axolotl's names (its SUPPORTED_METRICS) that Plait computes; comet is refused at validation
from plait.config.generation_keys import (ACCEPTED_METRICS, DEFAULT_METRICS, SACREBLEU_METRICS,  # noqa: F401
                                          metric_names, wanted)
from plait.errors import TrainingError
#: unset eval_max_new_tokens, as in Axolotl
DEFAULT_MAX_NEW_TOKENS = 128
#: the table written to output_dir at each evaluation with eval_table_size
TABLE_FILE = "eval_predictions.jsonl"


def max_new_tokens(cfg) -> int:
    return cfg.eval_max_new_tokens or DEFAULT_MAX_NEW_TOKENS


@dataclass
class Sample:
    """One eval row split into what the model is given and what it was trained to write."""

    row: int
    prompt_ids: list[int]
    reference_ids: list[int]
    prediction_ids: list[int] = field(default_factory=list)


def split_row(row: int, input_ids, labels) -> Sample | None:
    """The prompt (before the first trained token) and the first trained span of one row."""
    trained = [label != -100 for label in labels]
    if True not in trained:
        return None
    start = trained.index(True)
    if start == 0:
        return None
    end = start
    while end < len(trained) and trained[end]:
        end += 1
    return Sample(row, list(input_ids[:start]), list(input_ids[start:end]))


def eligible_samples(dataset, limit: int | None = None) -> tuple[list[Sample], int]:
    """The samples of ``dataset`` (at most ``limit``) and how many rows had none."""
    samples, skipped = [], 0
    for index in range(len(dataset)):
        if limit is not None and len(samples) >= limit:
            break
        row = dataset[index]
        sample = split_row(index, row["input_ids"], row["labels"])
        if sample is None:
            skipped += 1
        else:
            samples.append(sample)
    return samples, skipped


def generation_model(model):
    """The module that generates: DDP's local replica (DDP's own forward prepares a gradient sync)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def stop_token_ids(cfg, tokenizer, model_config=None) -> list[int]:
    """Where a greedy completion ends: the model's generation config's EOS ids
    (a model family's end-of-turn tokens, which plait-models adds there), the
    tokenizer's EOS and the config's ``eot_tokens``."""
    ids = []
    model_eos = getattr(model_config, "eos_token_id", None)
    for token_id in (model_eos if isinstance(model_eos, list) else [model_eos]) + [tokenizer.eos_token_id]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    vocab = tokenizer.get_vocab() if cfg.eot_tokens else {}
    for token in cfg.eot_tokens or []:
        # a token missing from the vocabulary would map to the unknown token: not a stop
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


def generate(model, samples: list[Sample], *, tokenizer, cfg, device, autocast, batch_size: int) -> None:
    """Fill ``prediction_ids`` of ``samples``: greedy completions of their prompts.

    Prompts are batched by length (least padding) and left-padded, so every
    row's completion starts at the same column. The model's generation config
    is kept (its stop tokens) and made greedy.
    """
    import copy

    import torch
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # the model's own generation config (its stop tokens) made greedy: sampling settings cleared
    own = getattr(model, "generation_config", None)
    config = copy.deepcopy(own) if own is not None else GenerationConfig()
    stops = stop_token_ids(cfg, tokenizer, own)
    config.update(max_new_tokens=max_new_tokens(cfg), max_length=None, min_new_tokens=None, min_length=0,
                  do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                  eos_token_id=stops or None, use_cache=True)
    by_length = sorted(samples, key=lambda s: len(s.prompt_ids))
    for first in range(0, len(by_length), batch_size):
        batch = by_length[first:first + batch_size]
        width = max(len(s.prompt_ids) for s in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(s.prompt_ids)) + s.prompt_ids for s in batch])
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in batch])
        with autocast:
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)
        for sample, tokens in zip(batch, out[:, width:].tolist()):
            # everything after the first stop token is padding of a finished row
            cut = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
            sample.prediction_ids = tokens[:cut]


def reference_nll(model, samples: list[Sample], *, tokenizer, device, autocast, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference tokens (each scored
    alone, after BOS where the tokenizer has one) and the number of tokens scored."""
    import torch

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    total, count = 0.0, 0
    for first in range(0, len(samples), batch_size):
        seqs = [bos + s.reference_ids for s in samples[first:first + batch_size]]
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with autocast:
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        targets = input_ids[:, 1:].clone()
        targets[mask[:, 1:] == 0] = -100
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((targets != -100).sum())
    return total, count


def corpus_scores(names, predictions: list[str], references: list[str]) -> dict[str, float]:
    """``eval_<name>`` for each sacrebleu metric in ``names``."""
    wanted_here = [name for name in names if name in SACREBLEU_METRICS]
    if not wanted_here:
        return {}
    import sacrebleu

    score = {"sacrebleu": sacrebleu.corpus_bleu, "ter": sacrebleu.corpus_ter, "chrf": sacrebleu.corpus_chrf}
    return {f"eval_{name}": float(score[name](predictions, [references]).score) for name in wanted_here}


@dataclass
class GenerationResult:
    """What one evaluation's generation gives: metrics and the table's rows (rank 0; empty elsewhere)."""

    metrics: dict
    table: list[dict]
    skipped: int


def check_unsharded(run) -> None:
    """Refuse a sharded model (a parallel plugin built a device mesh) for
    generation at evaluation (these keys and ``generate_samples``): ranks would
    have to generate in lockstep. The loop asks before the first step."""
    if run.mesh is None:
        return
    if wanted(run.cfg):
        raise TrainingError("do_causal_lm_eval / eval_table_size generate with the whole model on each process; "
                            "this run shards it over a device mesh (fsdp, tensor or context parallel); remove "
                            "those keys or the sharding")
    if run.cfg.generate_samples:
        raise TrainingError("generate_samples generates with the whole model on one process; this run shards it "
                            "over a device mesh (fsdp, tensor or context parallel); remove generate_samples or the "
                            "sharding")


def generate_and_score(run) -> GenerationResult:
    """Generate for the eval rows, score them, and build the table (see the module docstring)."""
    import torch

    from plait.train.distributed import all_reduce_sum
    from plait.train.loop import autocast

    cfg = run.cfg
    check_unsharded(run)
    names = metric_names(cfg)
    table_size = cfg.eval_table_size or 0
    samples, skipped = eligible_samples(run.eval_data, None if names else table_size)
    # each rank generates every world_size-th sample; rank 0 gathers them
    mine = samples[run.rank::run.world_size]
    model = generation_model(run.model)
    was_training = model.training
    model.eval()
    batch_size = cfg.eval_batch_size or cfg.micro_batch_size
    try:
        with torch.no_grad():
            generate(model, mine, tokenizer=run.tokenizer, cfg=cfg, device=run.device, autocast=autocast(run),
                     batch_size=batch_size)
            nll, count = (reference_nll(model, mine, tokenizer=run.tokenizer, device=run.device,
                                        autocast=autocast(run), batch_size=batch_size)
                          if "perplexity" in names else (0.0, 0))
    finally:
        model.train(was_training)
    if "perplexity" in names:
        nll, count = all_reduce_sum([nll, count], run.device)
    samples = gather_samples(run, mine)
    if not run.is_main:
        return GenerationResult({}, [], skipped)
    decode = partial_decode(run.tokenizer)
    predictions = [decode(s.prediction_ids) for s in samples]
    references = [decode(s.reference_ids) for s in samples]
    metrics = corpus_scores(names, predictions, references) if samples else {}
    if "perplexity" in names and count:
        metrics["eval_perplexity"] = math.exp(min(nll / count, 50.0))
    table = [{"step": run.step, "row": s.row, "prompt": decode(s.prompt_ids), "reference": ref, "prediction": pred}
             for s, ref, pred in zip(samples[:table_size], references, predictions)]
    return GenerationResult(metrics, table, skipped)


def partial_decode(tokenizer):
    """Token ids to text without special tokens (as Axolotl decodes both sides)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def gather_samples(run, mine: list[Sample]) -> list[Sample]:
    """Every rank's samples on rank 0, in row order (``mine`` alone on one process)."""
    if run.world_size <= 1:
        return sorted(mine, key=lambda s: s.row)
    import torch.distributed as dist

    gathered = [None] * run.world_size if run.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    if not run.is_main:
        return []
    return sorted((s for part in gathered for s in part), key=lambda s: s.row)
