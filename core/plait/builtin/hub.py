"""``hub_model_id``: push the finished run to the Hugging Face hub.

At the end of training (``on_train_end``, main rank) ``output_dir`` (the
saved model or adapter, tokenizer, config and report; checkpoints left out)
is uploaded with ``huggingface_hub`` to the repository, created if missing
(``hub_private_repo``), on its main branch or on ``hub_revision`` (a branch,
created from main if missing, as transformers' Trainer does). The id is checked without network when the config is
validated (``CoreConfig._repo_id``); ``hub_strategy`` accepts only ``end``.
"""

from __future__ import annotations

from plait.hookspecs import hookimpl

#: what stays local: checkpoints (resumable state) are not part of the published model
IGNORED = ["checkpoint-*", "checkpoint-*/**", "*.tmp"]


def push_output(cfg, output_dir: str, api=None) -> str:
    """Create ``hub_model_id`` (if needed) and upload ``output_dir``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(cfg.hub_model_id, private=bool(cfg.hub_private_repo), exist_ok=True)
    if cfg.hub_revision:
        api.create_branch(cfg.hub_model_id, branch=cfg.hub_revision, exist_ok=True)
    info = api.upload_folder(repo_id=cfg.hub_model_id, folder_path=output_dir, ignore_patterns=IGNORED,
                             commit_message="plait: trained model", revision=cfg.hub_revision)
    return str(getattr(info, "commit_url", info))


@hookimpl
def on_train_end(run):
    if run.cfg.hub_model_id and run.is_main:
        import sys

        url = push_output(run.cfg, str(run.output_dir))
        print(f"pushed {run.output_dir} to the hub: {url}", file=sys.stderr)
