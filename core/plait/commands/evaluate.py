"""`plait evaluate CONFIG`: eval loss and perplexity (or the objective's
metrics, such as DPO's rewards) of the trained model.

Scores the model saved in ``output_dir`` (``--model DIR`` for another one,
``--base`` for the untrained base) on the eval split the config defines
(``val_set_size`` or ``test_datasets``), or on the training set when there is
none, saying so. With ``do_causal_lm_eval`` it also generates and prints
``eval_causal_lm_metrics``; with ``eval_table_size`` the first rows' prompt,
reference and prediction (:mod:`plait.train.generation`).
"""

from __future__ import annotations

from plait.commands.common import add_config_arguments, load_run_config


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", metavar="DIR", help="a saved model or adapter (default: output_dir)")
    parser.add_argument("--base", action="store_true", help="score the base model, not the trained one")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args, pm) -> int:
    import json
    import sys
    from pathlib import Path

    cfg, pm = load_run_config(args, pm)
    from plait.train import generation
    from plait.train.distributed import World
    from plait.train.loop import Run, evaluate
    from plait.train.trained import load_trained

    model, tokenizer, source = load_trained(cfg, pm, cfg.base_model if args.base else args.model)
    from plait.data.prepare import prepare_datasets

    data = prepare_datasets(cfg, pm, tokenizer)
    split = "eval"
    dataset = getattr(data, "eval", None)
    if dataset is None or len(dataset) == 0:
        print("no eval split (set val_set_size or test_datasets); scoring the training set", file=sys.stderr)
        dataset, split = data.train, "train"
    device = next(model.parameters()).device
    run_ = Run(cfg=cfg, pm=pm, output_dir=Path(cfg.output_dir), world=World(device=device), tokenizer=tokenizer,
               model=model, eval_data=dataset)
    run_.loss_fn = pm.hook.build_loss(cfg=cfg, model=model)
    run_.objective = pm.hook.build_objective(cfg=cfg, model=model, loss_fn=run_.loss_fn)
    metrics = evaluate(run_)
    table = []
    if generation.wanted(cfg):  # do_causal_lm_eval / eval_table_size, as at each evaluation of a run
        generated = generation.generate_and_score(run_)
        metrics.update(generated.metrics)
        table = generated.table
    metrics.update(split=split, rows=len(dataset), model=str(source or cfg.base_model))
    if args.json:
        print(json.dumps({**metrics, "predictions": table} if table else metrics))
    else:
        print(f"model:      {metrics['model']}")
        unit = run_.objective.unit
        print(f"split:      {split} ({len(dataset)} rows, {metrics[f'eval_{unit}']} trained {unit})")
        print(f"eval_loss:  {metrics['eval_loss']:.4f}")
        if "eval_ppl" in metrics:
            print(f"perplexity: {metrics['eval_ppl']:.4f}")
        for name, value in metrics.items():
            if "/" in name:  # the objective's own metrics, e.g. eval_rewards/margins
                print(f"{name + ':':<11} {value:.4f}")
        for name in generation.ACCEPTED_METRICS:
            if f"eval_{name}" in metrics:
                print(f"{name + ':':<11} {metrics[f'eval_{name}']:.4f}")
        for row in table:
            print(f"\nrow {row['row']}\n  prompt:     {row['prompt']!r}\n  reference:  {row['reference']!r}\n"
                  f"  prediction: {row['prediction']!r}")
    return 0
