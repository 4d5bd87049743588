"""`vlmtune merge`: fold the LoRA weights into the base and save a model that plain transformers loads."""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import MergeConfig
from .modeling import load_for_inference
from .rundir import replace_dir


def merge(cfg: MergeConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another directory")
    model, processor, _, _ = load_for_inference(cfg.run, None, cfg.dtype)
    merged = model.merge_and_unload()
    # Written beside the target, then swapped in: an interrupted merge never leaves a half-written model at
    # `out`, and a merge over an earlier one never leaves `out` without a model.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    replace_dir(tmp, out)
    print(f"merged model written to {out}")
    return out
