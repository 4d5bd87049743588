"""`vlmtune merge`: fold the LoRA weights into the base and save a model that plain transformers loads."""

from __future__ import annotations

from pathlib import Path

from .atomic import build_dir
from .config import MergeConfig
from .modeling import load_for_inference


def merge(cfg: MergeConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another directory")
    model, processor, _, _ = load_for_inference(cfg.run, None, cfg.dtype)
    merged = model.merge_and_unload()

    # Written beside the target, then swapped in: an interrupted merge never leaves a half-written model at
    # `out`, and a merge over an earlier one never leaves `out` without a model.
    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    build_dir(out, write)
    print(f"merged model written to {out}")
    return out
