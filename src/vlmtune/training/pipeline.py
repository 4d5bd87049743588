"""The training data as the loop consumes it: the splits read and checked, the image-feature cache filled, the
epoch order, the loaders (map-style or a stream), the validation split and the fixed sample images."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from ..atomic import write_text
from ..config import TrainConfig
from ..data.batching import Collator
from ..data.checks import bad_as_dicts, bad_conversations, bad_report, find_bad_records
from ..data.examples import CaptionExamples, ConversationExamples, Prompting
from ..data.sources import detect, held_out_rows, is_conversation, load_splits, required_columns
from ..errors import DataError
from ..families import Family
from ..rundir import (
    JsonlLog,
)
from .cache import kept_features, wants_cache


@dataclass
class Batches:
    """The training and validation data as the loop consumes them."""

    loader: DataLoader
    order: Any  # what is told where each epoch starts: the EpochSampler, or the stream itself
    per_epoch: (
        int | None
    )  # this process's batches per epoch; None for a stream (its epoch ends when it runs out)
    features: Any  # the image-feature cache, or None
    cache_upto: str | None  # what the cache holds: the image path up to "projection" or up to "vision"
    val_loader: DataLoader | None
    val_features: Any  # the validation split's image-feature cache, or None
    val_examples: Any
    samples: list[dict[str, Any]]  # fixed examples captioned as training goes
    cache_s: float  # seconds spent filling the feature cache


def batches(
    cfg: TrainConfig,
    run: Path,
    accelerator: Any,
    model: Any,
    processor: Any,
    family: Family,
    dtype: torch.dtype,
    train_set: Any,
    val_set: Any,
) -> Batches:
    """Examples, the feature cache when the vision side is frozen, the epoch order and the loaders."""
    train_history = not cfg.train_on_last_turn_only
    collate = Collator(
        family,
        processor,
        cfg.max_length,
        train_history=train_history,
        multiple=cfg.padding_multiple(),
        max_positions=getattr(model.config.get_text_config(), "max_position_embeddings", None),
    )
    prompting = Prompting.of(cfg, family)

    def examples_of(split: Any, per_image: bool = False) -> Any:
        """A map-style split's examples, by its layout: conversations, or captions / answers."""
        if is_conversation(split.column_names, cfg):
            per_turn = not family.trains_history and train_history
            return ConversationExamples(
                split, cfg.messages_column, cfg.images_column, prompting, per_image, per_turn=per_turn
            )
        return CaptionExamples(split, cfg.image_column, cfg.text_column, prompting, per_image)

    if cfg.streaming:
        from ..data.stream import BadRecordLog, StreamExamples

        examples = StreamExamples(
            train_set,
            cfg.image_column,
            cfg.text_column,
            prompting,
            cfg.seed,
            cfg.shuffle_buffer,
            # each process decodes only its own share of the stream, so each reports its own bad records
            on_bad=BadRecordLog(run / "skipped.jsonl", cfg.split),
            batch_size=cfg.batch_size,
            process=(accelerator.process_index, accelerator.num_processes),
        )
    else:
        examples = examples_of(train_set)
    features, val_features, train_items, train_collate, cache_s = None, None, examples, collate, 0.0
    upto, why = wants_cache(cfg, family, model)
    accelerator.print(f"image feature cache: {'on' if upto else 'off'} ({why})")

    def cached(split: Any, name: str, spill_name: str, sizes: list) -> Any:
        """The image features of a split's rows, computed, or read where --feature-cache-dir kept them;
        `sizes` gets each row's image sizes."""
        rows = examples_of(split, per_image=True)
        found, kept = kept_features(
            model,
            family,
            collate,
            rows,
            dtype=dtype,
            accelerator=accelerator,
            keep_dir=Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else None,
            upto=upto,
            batch_size=4 * cfg.batch_size,
            num_workers=cfg.num_workers,
            spill_dir=run,
            spill_name=spill_name,
            sizes=sizes,
        )
        if kept:
            accelerator.print(f"{name} image features: {kept}")
        return found

    sizes: list = []  # each row's image sizes, where its text's layout needs them
    val_sizes: list = []
    if upto:
        clock = time.perf_counter()
        features = cached(train_set, "training", "feature_cache", sizes)
        if val_set is not None:  # validation then costs a language-model forward per example, no more
            val_features = cached(val_set, "validation", "feature_cache.val", val_sizes)
        cache_s = time.perf_counter() - clock
        train_items = examples.without_images(sizes)
        train_collate = dataclasses.replace(collate, cached=True)
    if cfg.packing:  # the training batches only: validation and the cache pass read examples as they are
        train_collate = dataclasses.replace(train_collate, pack=cfg.pack_length)
    # The data order is a function of (seed, epoch) alone, so a resumed run sees the same batches: a map-style
    # split's sampler, or (None) a stream that shuffles and positions itself.
    sampler = examples.epoch_order(
        cfg.seed, cfg.batch_size, one_caption=cfg.captions_per_epoch == "one", by_length=cfg.group_by_length
    )
    workers = examples.workers(cfg.num_workers)
    if workers < cfg.num_workers:
        accelerator.print(
            f"--num-workers {cfg.num_workers}: the stream has {workers} shard(s), so {workers} worker(s)"
        )
    # Its own generator too: each new iterator draws a seed, which must not come from the global generator
    # that dropout uses (a resumed run would then be one draw off).
    loader = DataLoader(
        train_items,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=train_collate,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_examples, val_loader = None, None
    if val_set is not None:
        val_examples = examples_of(val_set)
        # Each process scores every n-th example; the sums are added up across processes (a prepared loader
        # would pad the last batches with repeated examples, which would count twice).
        share = range(accelerator.process_index, len(val_examples), accelerator.num_processes)
        cached_val = val_features is not None
        val_loader = DataLoader(
            Subset(val_examples.without_images(val_sizes) if cached_val else val_examples, share),
            batch_size=cfg.batch_size,
            collate_fn=train_collate if cached_val else collate,
            num_workers=cfg.num_workers,
        )
    # Fixed images captioned as training goes.
    samples = (val_examples if val_examples is not None else examples).head(cfg.num_samples)

    return Batches(
        loader,
        sampler if sampler is not None else train_items,
        len(loader) if sampler is not None else None,
        features,
        upto,
        val_loader,
        val_features,
        val_examples,
        samples,
        cache_s,
    )


def load_data(cfg: TrainConfig, run: Path) -> tuple[Any, Any]:
    """(train split, validation split or None), checked; the split written to RUN_DIR/split.json. With
    --streaming the train split is a `datasets.IterableDataset` (and the validation split, small by nature,
    is read in full)."""
    columns = required_columns(cfg)
    if process().is_main_process:
        print(f"data: {cfg.data} ({detect(cfg.data)[0]}{', streaming' if cfg.streaming else ''})")
    split_doc: dict[str, Any] = {
        "data": cfg.data,
        "split": cfg.split,
        "val_split": cfg.val_split,
        "seed": cfg.seed,
    }
    if cfg.streaming:
        import datasets

        from ..data.stream import load_stream

        if detect(cfg.data)[0] == "conversations":
            raise DataError("--streaming reads caption and question layouts; conversations train map-style")
        columns = (cfg.image_column, cfg.text_column) + (
            (cfg.question_column,) if cfg.question_column else ()
        )

        train_set, val_set = load_stream(cfg.data, cfg.split, columns, cfg.image_root), None
        if cfg.val_split:
            stream = load_stream(cfg.data, cfg.val_split, columns, cfg.image_root)
            val_set = datasets.Dataset.from_generator(lambda: (yield from stream), features=stream.features)
        split_doc.update(streaming=True, shuffle_buffer=cfg.shuffle_buffer)
    else:
        train_set, val_set = load_splits(
            cfg.data, cfg.split, cfg.val_split, cfg.val_fraction, columns, cfg.seed, cfg.image_root
        )
        split_doc.update(train_rows=len(train_set), val_fraction=cfg.val_fraction)
        if cfg.val_fraction:
            split_doc["val_rows_of_split"] = held_out_rows(
                len(train_set) + len(val_set), cfg.val_fraction, cfg.seed
            )
    write_text(run / "split.json", json.dumps(split_doc) + "\n")
    # Every record is checked now, so a bad one stops nothing halfway through an epoch (a stream's records
    # are checked as they come).
    if not cfg.streaming:
        train_set = drop_bad(train_set, cfg, run, cfg.split)
    if val_set is not None:
        val_set = drop_bad(val_set, cfg, run, cfg.val_split or "validation")
    return train_set, val_set


def process() -> Any:
    """This process's place in the run (rank, device), as the Accelerator will see it. Asked before the
    Accelerator exists, so it must read `ACCELERATE_USE_CPU` as the Accelerator does: processes started by
    torchrun on CPUs would otherwise each take themselves for the only one."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def drop_bad(dataset: Any, cfg: TrainConfig, run: Path, split: str) -> Any:
    """`dataset` without its bad records with --skip-bad (listed in skipped.jsonl); otherwise an error naming all."""
    if is_conversation(dataset.column_names, cfg):
        from ..families import family_for
        from ..modeling import load_config, load_processor, resolve_model

        # The tokenizer and config alone (no weights): a conversation's length is checked as training counts.
        family = family_for(load_config(cfg.model))
        processor = load_processor(resolve_model(cfg.model))
        bad = bad_conversations(dataset, cfg, family, processor)
    else:
        bad = find_bad_records(dataset, cfg.image_column, cfg.text_column)
    if not bad:
        return dataset
    if not cfg.skip_bad:
        raise DataError(bad_report(cfg.data, split, bad))
    log = JsonlLog(run / "skipped.jsonl", enabled=process().is_main_process)
    for record in bad_as_dicts(bad):
        log.write(split=split, **record)
    rows = {b.row for b in bad}
    print(
        f"--skip-bad: {len(rows)} bad record(s) of split {split!r} left out, listed in {run / 'skipped.jsonl'}"
    )
    return dataset.select([i for i in range(len(dataset)) if i not in rows])
