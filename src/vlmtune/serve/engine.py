"""The model side of the server: one base with its adapters in memory, and dynamic batching of requests.

Requests arrive one by one on the event loop; the `Batcher` collects those that arrive within a few
milliseconds of each other (and every one that queued while the model was busy) into one `generate` call,
which runs on a worker thread so the event loop keeps accepting requests. A batch holds one adapter (or
the bare base): peft's mixed-adapter batches split rows on the first dimension, and OPT flattens batch and
sequence into one before its MLP, so rows for different adapters go into separate batches of one cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..families import Family, family_for
from ..infer import trained_prompt
from ..modeling import (
    TINY,
    TINY_PATH,
    base_of_runs,
    default_device,
    load_config,
    load_processor,
    load_with_adapters,
    pick_dtype,
)

BASE = "__base__"  # the bare base model, no adapter


@dataclass(frozen=True)
class Adapter:
    """One model id a client can ask for."""

    name: str  # what clients send as `model`
    peft_name: str  # the adapter's name inside the peft model, or BASE
    prompt: str  # the prompt its run trained with: captions continue it
    source: str  # run directory or base model


@dataclass(frozen=True)
class Sampling:
    """Generation settings that must be equal across a batch (max_tokens need not be: it is cut per row)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end of sequence) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    """One completion to generate. `on_text` (if set) is called from the worker thread with each new piece."""

    images: Image.Image | Sequence[Image.Image]  # the image, or the images in the order the turns show them
    prompt: str
    adapter: Adapter
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None
    future: asyncio.Future | None = None
    history: tuple[tuple[str, str], ...] = ()  # the conversation's earlier exchanges, rendered
    turn_images: tuple[int, ...] | None = (
        None  # how many images each user turn shows (default: all in the first)
    )


def parse_runs(runs: Sequence[str]) -> dict[str, str]:
    """`NAME=RUN_DIR` or `RUN_DIR` (named after its folder) -> {name: run_dir}; duplicate names are an error."""
    out: dict[str, str] = {}
    for spec in runs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise ValueError(f"--run {spec!r}: use NAME=RUN_DIR or RUN_DIR")
        if name in out:
            raise ValueError(f"--run: two runs are named {name!r}; name them apart with NAME=RUN_DIR")
        out[name] = path
    return out


class Engine:
    """A base model, its adapters, and the generation of a batch of jobs (on whatever thread calls `run`)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        family: Family,
        adapters: list[Adapter],
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        vllm: Any = None,
    ):
        self.model, self.processor, self.family = model, processor, family
        self.vllm = (
            vllm  # a `VllmGenerator` holding the adapters under their `peft_name`s, in place of `model`
        )
        self.adapters = {a.name: a for a in adapters}
        # A request that names no model gets the first run's adapter (the base when serving no run).
        self.default = next((a for a in adapters if a.peft_name != BASE), adapters[0])
        self.device, self.dtype = device or torch.device("cpu"), dtype
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0}

    @classmethod
    def load(
        cls, runs: dict[str, str], model: str | None, dtype: str = "auto", engine: str = "transformers"
    ) -> Engine:
        """The base (from `model`, or the runs' recorded base) with every run's adapter loaded into it; on
        vLLM with `engine="vllm"`."""
        device = default_device()
        # peft adapter names become module keys (no dots allowed), so clients' names map to a0, a1, ...
        keys = {f"a{i}": name for i, name in enumerate(runs)}
        by_key = {key: runs[name] for key, name in keys.items()}
        base_path, infos = base_of_runs(by_key, model)
        base_name = model or (TINY if Path(base_path) == TINY_PATH.resolve() else base_path)
        if base_name in runs:
            raise ValueError(f"--run name {base_name!r} is the base model's name; pick another")
        generator = None
        if engine == "vllm":
            from ..vllm_engine import VllmGenerator

            first = next(iter(by_key.values()), None)
            processor = load_processor(str(Path(first).resolve()) if first else base_path)
            family = family_for(load_config(base_path))
            base, generator = None, VllmGenerator(base_path, family, processor, by_key, dtype)
        else:
            base, processor, family = load_with_adapters(base_path, by_key, dtype, device)
        adapters = [Adapter(base_name, BASE, family.caption_prompt, base_path)] + [
            Adapter(name, key, trained_prompt(infos[key], family), str(by_key[key]))
            for key, name in keys.items()
        ]
        return cls(base, processor, family, adapters, device, pick_dtype(dtype, device), generator)

    def adapter(self, name: str | None) -> Adapter:
        if not name:
            return self.default
        if name not in self.adapters:
            raise KeyError(name)
        return self.adapters[name]

    def _using(self, adapter: Adapter) -> contextlib.AbstractContextManager:
        """Route generation through `adapter` (only the worker thread calls this, so no request sees another's)."""
        if all(a.peft_name == BASE for a in self.adapters.values()):
            return contextlib.nullcontext()  # a bare base model
        if adapter.peft_name == BASE:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter.peft_name)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def run(self, jobs: Sequence[Job]) -> list[Result]:
        """Generate every job in one batch. All jobs must share `adapter` and `sampling`."""
        if len({(j.adapter, j.sampling) for j in jobs}) != 1:
            raise ValueError("one batch takes one adapter and one sampling setting")
        fam, proc = self.family, self.processor
        if self.vllm is not None:
            prompt_tokens, new = self._on_vllm(jobs)
            return self._results(jobs, prompt_tokens, new)
        batch = fam.generation_inputs(
            proc,
            [j.images for j in jobs],
            [j.prompt for j in jobs],
            self.device,
            self.dtype,
            history=[j.history for j in jobs],
            turn_images=[j.turn_images for j in jobs],
        )
        prompt_tokens = batch["attention_mask"].sum(1).tolist()
        new: dict[int, list[int]] = {}
        with self._using(jobs[0].adapter):
            for rows, sub in fam.generation_groups(batch):  # one group unless the family must split
                group = [jobs[i] for i in rows]
                limits = [j.max_tokens for j in group]
                kwargs: dict[str, Any] = {
                    "max_new_tokens": max(limits),
                    "stopping_criteria": _stopping([_RowLimit(limits)]),
                    **jobs[0].sampling.generate_kwargs(),
                }
                if any(j.on_text for j in group):
                    kwargs["streamer"] = _RowStreamer(self, group)
                new.update(
                    zip(rows, fam.generate_tokens(self.model, proc, sub, **kwargs).tolist(), strict=True)
                )
        return self._results(jobs, prompt_tokens, new)

    def _on_vllm(self, jobs: Sequence[Job]) -> tuple[list[int], dict[int, list[int]]]:
        """(prompt tokens, new tokens by row) of a batch on vLLM; a streaming job gets its text in one piece."""
        adapter = jobs[0].adapter
        rows = self.vllm.run(
            [j.images for j in jobs],
            [j.prompt for j in jobs],
            history=[j.history for j in jobs],
            turn_images=[j.turn_images for j in jobs],
            adapter=None if adapter.peft_name == BASE else adapter.peft_name,
            max_new_tokens=max(j.max_tokens for j in jobs),
            **jobs[0].sampling.generate_kwargs(),
        )
        for job, (_, ids) in zip(jobs, rows, strict=True):
            if job.on_text:
                text = self.family.decode(self.processor, ids[: job.max_tokens])
                if text:
                    job.on_text(text)
        return [n for n, _ in rows], dict(enumerate(ids for _, ids in rows))

    def _results(
        self, jobs: Sequence[Job], prompt_tokens: list[int], new: dict[int, list[int]]
    ) -> list[Result]:
        """Each job's text, cut at its own max_tokens, and why it stopped."""
        fam, proc = self.family, self.processor
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        results = []
        for i, (job, n_prompt) in enumerate(zip(jobs, prompt_tokens, strict=True)):
            row = new[i][: job.max_tokens]
            ids = fam.cut(row)
            stopped = len(ids) < len(row)  # an end token came before max_tokens
            results.append(
                Result(fam.decode(proc, ids), "stop" if stopped else "length", n_prompt, len(ids) + stopped)
            )
        return results


def _stopping(criteria: list[Any]) -> Any:
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(criteria)


class _RowLimit:
    """Stops each row at its own max_tokens (generate's max_new_tokens is the batch's largest)."""

    def __init__(self, limits: list[int]):
        self.limits = torch.tensor(limits)
        # Called after each new token: what came before the first is the prompt (decoder-only) or the
        # decoder's start token (encoder-decoder), whichever the family's model generates from.
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        done = (input_ids.shape[1] - self.start) >= self.limits
        return done.to(input_ids.device)


class _RowStreamer:
    """transformers calls `put` with the prompt (B, T), then with each step's tokens (B,); each job's new text
    goes to its `on_text`. Text is sent only once it decodes cleanly (a character split over two byte-level
    tokens waits for the second) and without surrounding whitespace, so the pieces join into the final text."""

    def __init__(self, engine: Engine, jobs: Sequence[Job]):
        self.engine, self.jobs = engine, jobs
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.done = [False] * len(jobs)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # the prompt
            return
        fam, proc = self.engine.family, self.engine.processor
        for i, (tok, job) in enumerate(zip(value.tolist(), self.jobs, strict=True)):
            if self.done[i]:
                continue
            if tok in fam.end_token_ids:
                self.done[i] = True
                continue
            self.ids[i].append(tok)
            self.done[i] = len(self.ids[i]) >= job.max_tokens
            text = fam.decode(proc, self.ids[i])
            if job.on_text and not text.endswith("\ufffd") and text.startswith(self.sent[i]):
                piece, self.sent[i] = text[len(self.sent[i]) :], text
                if piece:
                    job.on_text(piece)

    def end(self) -> None:
        pass


class Batcher:
    """Collects jobs on the event loop and runs them through `engine.run` in batches on one worker thread."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_wait_s: float = 0.005):
        self.engine, self.max_batch, self.max_wait_s = engine, max_batch, max_wait_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmtune-generate")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.worker.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> asyncio.Future:
        job.future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(job)
        return job.future

    @property
    def waiting(self) -> int:
        return self.queue.qsize()

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            if not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [j for j in jobs if j.future is not None and not j.future.done()]  # timed out: dropped

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            groups: dict[tuple[Adapter, Sampling], list[Job]] = defaultdict(list)
            for job in await self._collect():
                groups[job.adapter, job.sampling].append(job)
            for jobs in groups.values():
                try:
                    results = await loop.run_in_executor(self.worker, self.engine.run, jobs)
                except Exception as e:  # the batch fails, the server does not
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                for j, r in zip(jobs, results, strict=True):
                    if not j.future.done():
                        j.future.set_result(r)
