"""Training data as a stream (`--streaming`): records are read as training reaches them, so a dataset far
larger than memory or disk (a hub dataset of a million images) trains without being loaded or downloaded.

What changes against the map-style path: the length is unknown, so `--max-steps` sets the run's length; no
record can be checked before training, so a bad one is skipped when reached and listed in
RUN_DIR/skipped.jsonl; the order is a seeded shuffle buffer (`--shuffle-buffer`) reseeded each epoch, so a
resumed run skips exactly the examples it had consumed. With `--num-workers N`, `datasets` gives each worker
its own shards of the stream (files of a hub or parquet dataset; up to 64 shards of a local one), so at most
as many workers as shards do any work, and the batches depend on the worker count.

With several processes each one reads the stream and keeps every n-th example (the same shuffle in every
process, process p the examples p, p + n, ...), skipping the others' undecoded: the same examples overall as
one process, and each step's batches together are the one-process run's batch at n times the size. A process's
epoch may run out a batch before another's (a bad record, a short last batch); `InStep` ends it for all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .examples import Dialogue, Prompting, checked_target, targets_of
from .images import as_image, file_of
from .sources import load_dict, pick_split


def load_stream(source: str, split: str, columns: tuple[str, ...], image_root: str | None = None) -> Any:
    """Split `split` of `source` as a `datasets.IterableDataset`, with `columns` checked."""
    import datasets

    stream = pick_split(load_dict(source, image_root, streaming=True), source, split, columns)
    if isinstance((stream.features or {}).get(columns[0]), datasets.Image):
        # Bytes in, decoded by vlmtune: a broken image becomes a skipped record, not an exception in datasets.
        stream = stream.cast_column(columns[0], datasets.Image(decode=False))
    return stream


class StreamExamples(torch.utils.data.IterableDataset):
    """(image, prompt, target) examples from a stream, one per caption, images decoded as they are reached.

    `position(epoch, start)` sets the epoch's shuffle and how many examples of it to skip (those a resumed
    run had already trained on). A bad record is skipped and handed to `on_bad({position, epoch, file, text,
    why})`: its position in the epoch's (shuffled) stream, its image file when it has one, and its caption,
    since a shuffled stream keeps no row numbers.
    """

    def __init__(
        self,
        stream: Any,
        image_column: str = "image",
        text_column: str = "text",
        prompting: Prompting | None = None,
        seed: int = 42,
        shuffle_buffer: int = 1000,
        on_bad: Any = None,
        batch_size: int = 1,
        process: tuple[int, int] = (0, 1),
    ):
        self.stream, self.image_column, self.text_column = stream, image_column, text_column
        self.prompting = prompting or Prompting()
        self.seed, self.shuffle_buffer, self.on_bad, self.batch_size = (
            seed,
            shuffle_buffer,
            on_bad,
            batch_size,
        )
        self.rank, self.processes = process  # this process keeps examples rank, rank + processes, ...
        self.epoch, self.start = 0, 0

    def position(self, epoch: int, start: int) -> None:
        """Epoch `epoch`, less its first `start` good examples over all processes (whole batches a resumed run
        trained on)."""
        self.epoch, self.start = epoch, start

    def records(self) -> Iterator[dict[str, Any]]:
        stream = self.stream
        if self.shuffle_buffer > 1:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        stream.set_epoch(self.epoch)  # a new shuffle each epoch, the same one for a given (seed, epoch)
        return iter(stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # In a DataLoader worker, `datasets` hands this worker its own shards of the stream (see `workers`);
        # the loader takes whole batches from the workers in turn, so worker w made batches w, w + n, ...
        worker = torch.utils.data.get_worker_info()
        n, w = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        own = self.start // self.processes  # this process's batches are its share of every step
        skip = len(range(w, own // self.batch_size, n)) * self.batch_size  # already trained on
        k = -1
        for r, row in enumerate(self.records()):
            for text in targets_of(row[self.text_column]):
                k += 1
                if k % self.processes != self.rank:  # another process's example: not decoded here
                    continue
                example = self._example(r, row, text, report=skip == 0)  # replayed bad ones: reported before
                if example is None:
                    continue
                if skip:
                    skip -= 1
                    continue
                yield example

    def epoch_order(self, *args: Any, **kwargs: Any) -> None:
        """No sampler: the stream shuffles itself, by (seed, epoch), and `position` skips what was trained."""
        return None

    def workers(self, asked: int) -> int:
        """DataLoader workers that get a share: `datasets` splits a stream between workers by shard."""
        return min(asked, getattr(self.stream, "n_shards", 1))

    def _example(self, r: int, row: dict[str, Any], text: Any, report: bool = True) -> dict[str, Any] | None:
        try:
            checked_target(text, f"column {self.text_column!r}")
            image = as_image(row[self.image_column], f"column {self.image_column!r}")
        except DataError as e:
            if self.on_bad is not None and report:
                file = file_of(row.get(self.image_column))
                self.on_bad(
                    {"position": r, "epoch": self.epoch, "file": file, "text": str(text)[:80], "why": str(e)}
                )
            return None
        return Dialogue(self.prompting(row), text).example([image], r)

    def head(self, n: int) -> list[dict[str, Any]]:
        """The first `n` good examples in stream order (no shuffle): fixed samples to caption during training."""
        out = []
        for r, row in enumerate(self.stream):
            for t in targets_of(row[self.text_column]):
                example = self._example(r, row, t)
                if example is not None:
                    out.append(example)
                if len(out) >= n:
                    return out
        return out


class InStep:
    """A process's batches of the stream, ending for every process as soon as one has none left: each step of
    data-parallel training needs a batch from every process (a tiny all-reduce per batch says who has one)."""

    def __init__(self, loader: Any, accelerator: Any):
        self.loader, self.accelerator = loader, accelerator

    def __iter__(self) -> Iterator[Any]:
        for batch in self._with_end():
            have = torch.tensor([batch is not None], dtype=torch.int32, device=self.accelerator.device)
            if int(self.accelerator.reduce(have, "sum").item()) < self.accelerator.num_processes:
                return
            yield batch

    def _with_end(self) -> Iterator[Any]:
        yield from self.loader
        while True:  # none left here: say so at each step until the others know too
            yield None


class BadRecordLog:
    """Appends each skipped streamed record to RUN_DIR/skipped.jsonl (picklable, for DataLoader workers)."""

    def __init__(self, path: Path, split: str):
        self.path, self.split = path, split

    def __call__(self, record: dict[str, Any]) -> None:
        import json

        with self.path.open("a") as f:  # one short line per append: whole lines even from several workers
            f.write(json.dumps({"split": self.split, **record}) + "\n")
