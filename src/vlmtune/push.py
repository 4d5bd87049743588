"""`vlmtune push RUN_DIR REPO_ID`: the run directory as a Hub model repo, in one commit.

What goes: the adapter and processor (the repo loads with plain peft, like the directory), the model card
(README.md, the Hub's page), vlmtune.yaml, the logs, `best/`, `eval/`'s report and TensorBoard's events (the
Hub shows them in its Metrics tab). What stays: checkpoints/ (unless --checkpoints), feature caches, W&B's
local files and trackers.json (they name this machine's paths and stores).
"""

from __future__ import annotations

from pathlib import Path

from .config import PushConfig
from .rundir import read_run
from .tracking import IDS_FILE

LEFT_OUT = ["checkpoints/**", "feature_cache*", "wandb/**", IDS_FILE, "**/.*", ".*"]


def push(cfg: PushConfig) -> str:
    """Create (or reuse) `cfg.repo_id` and commit the run directory to it; returns the commit's URL."""
    from huggingface_hub import HfApi

    if not cfg.repo_id or cfg.repo_id.count("/") != 1:
        raise ValueError(f"REPO_ID must be user/name or org/name (got {cfg.repo_id!r})")
    info = read_run(cfg.run)  # a finished run, or a clear error before any request
    run = Path(cfg.run)
    api = HfApi(endpoint=cfg.endpoint, token=cfg.token)
    url = api.create_repo(cfg.repo_id, repo_type="model", private=cfg.private, exist_ok=True)
    if cfg.revision != "main":
        api.create_branch(cfg.repo_id, branch=cfg.revision, repo_type="model", exist_ok=True)
    left_out = [p for p in LEFT_OUT if not (cfg.checkpoints and p.startswith("checkpoints"))]
    message = (
        cfg.message or f"vlmtune: LoRA adapter for {info['base_model']} trained on {info['config']['data']}"
    )
    commit = api.upload_folder(
        repo_id=cfg.repo_id,
        folder_path=run,
        repo_type="model",
        revision=cfg.revision,
        commit_message=message,
        ignore_patterns=left_out,
    )
    print(f"pushed {run} to {url}: {commit.commit_url}")
    return commit.commit_url
