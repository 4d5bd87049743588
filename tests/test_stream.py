"""--streaming: a dataset read as it is trained on. Trains, resumes to the same adapter bit for bit, skips and
lists bad records as it reaches them, and holds no more in memory for 10x the records."""

from dataclasses import replace

import pytest
import torch
from datasets import Dataset, Features, Image, Value, load_from_disk
from safetensors.torch import load_file

import vlmtune.training.loop as loop
import vlmtune.training.run as finetune
from vlmtune.config import ConfigError, TrainConfig
from vlmtune.data.stream import StreamExamples, load_stream
from vlmtune.data.synthetic import examples
from vlmtune.errors import DataError
from vlmtune.rundir import read_jsonl

FEATURES = Features({"image": Image(), "text": Value("string")})


def parquet(path, images, texts):
    Dataset.from_dict({"image": images, "text": texts}, features=FEATURES).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def stream_data(football, tmp_path_factory):
    """20 football scenes and, at row 7, an image that is not one."""
    rows = load_from_disk(football)["train"].select(range(19))
    images, texts = list(rows["image"]), list(rows["text"])
    images.insert(7, {"bytes": b"not a picture", "path": None})
    texts.insert(7, "a broken record")
    return parquet(tmp_path_factory.mktemp("stream") / "train.parquet", images, texts)


def config(data, out, **kw):
    return TrainConfig(
        model="tiny",
        data=data,
        output=str(out),
        streaming=True,
        max_steps=8,
        batch_size=4,
        shuffle_buffer=16,
        lr=1e-2,
        save_every=3,
        sample_every=0,
        num_samples=1,
        log_every=1,
        lora_dropout=0.1,
        seed=5,
        **kw,
    )


def test_streaming_needs_max_steps_and_no_full_dataset_options():
    with pytest.raises(ConfigError) as e:
        finetune.train(TrainConfig(model="tiny", streaming=True, val_fraction=0.1, captions_per_epoch="one"))
    for words in ("--max-steps", "--val-split", "--captions-per-epoch"):
        assert words in str(e.value)


def test_stream_names_missing_columns(stream_data):
    with pytest.raises(DataError, match="no column 'caption'; its columns: image, text"):
        load_stream(stream_data, "train", ("image", "caption"))


@pytest.mark.slow
def test_streaming_trains_skips_bad_records_and_resumes_bitwise(stream_data, tmp_path, monkeypatch):
    straight = finetune.train(config(stream_data, tmp_path / "straight"))
    logged = [r for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    # 19 good records in batches of 4: 5 batches an epoch, so 8 steps run into a second, reshuffled epoch.
    assert {r["epoch"] for r in logged} == {0, 1}
    skipped = read_jsonl(straight / "skipped.jsonl")
    assert [(s["text"], s["epoch"]) for s in skipped] == [("a broken record", 0), ("a broken record", 1)]
    assert "cannot be read" in skipped[0]["why"]

    class Crash(Exception):
        pass

    real = loop.Session.after_step

    def crash_at_5(self, state, *args, **kwargs):
        real(self, state, *args, **kwargs)
        if state.step == 5:
            raise Crash

    monkeypatch.setattr(loop.Session, "after_step", crash_at_5)
    with pytest.raises(Crash):
        finetune.train(config(stream_data, tmp_path / "resumed"))
    monkeypatch.undo()
    resumed = finetune.train(replace(config(stream_data, tmp_path / "resumed"), resume="auto"))

    a, b = (
        load_file(str(straight / "adapter_model.safetensors")),
        load_file(str(resumed / "adapter_model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed stream trained on other batches"
    assert [r["loss"] for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r] == [
        r["loss"] for r in logged
    ]


@pytest.mark.slow
def test_streaming_memory_stays_flat(tmp_path):
    """Iterating 2,000 streamed records holds no more in memory than 200 do."""
    import tracemalloc

    from torch.utils.data import DataLoader

    def peak(n):
        rows = list(examples("shapes", n, seed=n))
        source = parquet(tmp_path / f"s{n}.parquet", [r.image for r in rows], [r.text for r in rows])
        stream = StreamExamples(load_stream(source, "train", ("image", "text")), shuffle_buffer=64)
        tracemalloc.start()
        assert sum(DataLoader(stream, batch_size=16, collate_fn=len)) == n
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(200), peak(2000)
    assert large < 2 * small + 2**20, (small, large)


def _targets(batch):
    return [e["target"] for e in batch]


def test_stream_workers_share_the_decoding_and_resume_where_they_were(stream_data, tmp_path):
    from datasets import load_dataset
    from torch.utils.data import DataLoader

    saved = tmp_path / "saved"
    load_dataset("parquet", data_files=stream_data)["train"].save_to_disk(str(saved))
    stream = load_stream(str(saved), "train", ("image", "text"))
    assert stream.n_shards == 20  # a local dataset streams in shards, which workers split between them
    ex = StreamExamples(stream, seed=5, shuffle_buffer=16, batch_size=4)
    assert ex.workers(2) == 2
    ex.position(1, 0)
    alone = _targets(ex)  # no workers
    batches = list(DataLoader(ex, batch_size=4, num_workers=2, collate_fn=_targets))
    assert (
        sorted(t for b in batches for t in b) == sorted(alone) and len(alone) == 19
    )  # each once, bad one out
    ex.position(1, 2 * 4)  # two batches trained on, one from each worker
    assert list(DataLoader(ex, batch_size=4, num_workers=2, collate_fn=_targets)) == batches[2:]


def test_streaming_an_unreachable_hub_dataset_says_what_to_do():
    with pytest.raises(DataError, match="could not be reached") as e:
        load_stream("nobody-here/no-such-dataset", "train", ("image", "text"))
    assert "--data DIR" in str(e.value)


@pytest.mark.slow
def test_streaming_with_a_validation_split(football, tmp_path):
    """A parquet folder in the hub's layout (train-*.parquet, validation-*.parquet): the train split streams,
    the validation split is read in full and scored."""
    ds = load_from_disk(football)
    folder = tmp_path / "data"
    folder.mkdir()
    ds["train"].select(range(16)).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    ds["validation"].select(range(8)).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    run = finetune.train(
        replace(
            config(str(folder), tmp_path / "run"),
            val_split="validation",
            max_steps=4,
            eval_every=2,
            save_every=0,
        )
    )
    val = [r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    assert not (run / "skipped.jsonl").exists()


def test_each_process_decodes_only_its_share_of_the_stream(football, tmp_path, monkeypatch):
    """Two processes keep examples 0, 2, 4 ... and 1, 3, 5 ... of the same shuffled stream, decoding no other:
    together, in step order, the one-process stream; a resumed position skips each process's own share."""
    import vlmtune.data.stream as stream_module

    rows = load_from_disk(football)["train"].select(range(12))
    texts = [f"record {i}" for i in range(12)]
    data = parquet(tmp_path / "train.parquet", list(rows["image"]), texts)
    decoded = []
    real = stream_module.as_image
    monkeypatch.setattr(stream_module, "as_image", lambda *a: decoded.append(1) or real(*a))

    def order(rank, processes, start=0):
        examples = StreamExamples(
            load_stream(data, "train", ("image", "text")),
            shuffle_buffer=8,
            seed=1,
            batch_size=2,
            process=(rank, processes),
        )
        examples.position(0, start)
        decoded.clear()
        got = [x["target"] for x in examples]
        return got, len(decoded)

    alone, _ = order(0, 1)
    assert sorted(alone) == sorted(texts) and alone != texts  # shuffled
    (first, first_decoded), (second, second_decoded) = order(0, 2), order(1, 2)
    assert first == alone[0::2] and second == alone[1::2]
    assert first_decoded == second_decoded == 6  # the other process's six images were never decoded
    # 8 examples trained over both processes (two steps of 2 x 2): each skips its own first 4
    assert order(0, 2, start=8)[0] == alone[8::2] and order(1, 2, start=8)[0] == alone[9::2]
