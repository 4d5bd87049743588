"""The dataset layouts `--data` reads give the same records; images arrive as RGB."""

import json

import numpy as np
import pytest
from datasets import load_from_disk
from PIL import Image

from vlmtune.data.examples import CaptionExamples
from vlmtune.data.images import to_rgb
from vlmtune.data.sources import load_splits
from vlmtune.data.synthetic import examples
from vlmtune.errors import DataError


@pytest.fixture(scope="module")
def rows():
    return list(examples("football", 6, seed=7))


def records(ds, text_column="text"):
    items = CaptionExamples(ds, "image", text_column)
    return [(np.asarray(items[i]["images"][0]).tobytes(), items[i]["target"]) for i in range(len(items))]


def expected(rows):
    return [(np.asarray(r.image).tobytes(), r.text) for r in rows]


def test_save_to_disk(rows, tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {"train": Dataset.from_dict({"image": [r.image for r in rows], "text": [r.text for r in rows]})}
    ).save_to_disk(str(tmp_path / "d"))
    train, val = load_splits(str(tmp_path / "d"))
    assert val is None and records(train) == expected(rows)


def test_parquet_hub_layout(rows, tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "text": Value("string")})
    (tmp_path / "data").mkdir()
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        Dataset.from_dict(
            {"image": [r.image for r in part], "text": [r.text for r in part]}, features=features
        ).to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    train, test = load_splits(str(tmp_path), val_split="test")
    assert records(train) == expected(rows[:4]) and records(test) == expected(rows[4:])


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder(rows, tmp_path, metadata):
    for i, r in enumerate(rows):
        r.image.save(tmp_path / f"{i}.png")
    if metadata == "jsonl":
        (tmp_path / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": f"{i}.png", "text": r.text}) + "\n" for i, r in enumerate(rows))
        )
    else:
        (tmp_path / "metadata.csv").write_text(
            "file_name,text\n" + "".join(f'{i}.png,"{r.text}"\n' for i, r in enumerate(rows))
        )
    train, _ = load_splits(str(tmp_path))
    assert sorted(records(train), key=lambda x: x[1]) == sorted(expected(rows), key=lambda x: x[1])


def test_val_fraction_is_deterministic(football):
    a_train, a_val = load_splits(football, val_fraction=0.25, seed=3)
    b_train, b_val = load_splits(football, val_fraction=0.25, seed=3)
    assert a_val["text"] == b_val["text"] and len(a_val) == 60 and len(a_train) == 180
    assert load_splits(football, val_fraction=0.25, seed=4)[1]["text"] != a_val["text"]


def test_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a dataset vlmtune can read"):
        load_splits(str(tmp_path))


def test_empty_caption_is_named(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "text": ["  "]})
    with pytest.raises(DataError, match="row 0, column 'text'"):
        CaptionExamples(ds)[0]


def test_to_rgb():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # composited on white, not black
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert to_rgb(pal).getpixel((0, 0)) == (10, 20, 30)


def test_demo_dataset_is_deterministic(football, tmp_path):
    from vlmtune.data.synthetic import write_football_dataset

    again = load_from_disk(str(write_football_dataset(tmp_path / "again")))
    first = load_from_disk(football)
    assert {k: len(v) for k, v in first.items()} == {"train": 240, "validation": 24, "test": 24}
    assert again["test"]["text"] == first["test"]["text"]
    assert np.array_equal(np.asarray(again["test"][0]["image"]), np.asarray(first["test"][0]["image"]))


def test_broken_local_dataset_is_not_called_unreachable(tmp_path):
    (tmp_path / "dataset_dict.json").write_text("{not json")
    with pytest.raises(DataError, match=f"cannot read dataset {tmp_path}"):
        load_splits(str(tmp_path))


def test_epoch_sampler_one_example_per_image():
    from vlmtune.data.batching import EpochSampler

    groups = [[0, 1, 2], [3], [4, 5]]  # image 0 has three captions, image 1 one, image 2 two
    sampler = EpochSampler(6, seed=1, groups=groups)
    seen = set()
    for epoch in range(30):
        sampler.position(epoch, 0)
        order = list(sampler)
        assert len(order) == len(sampler) == 3
        assert sorted(next(g for g, grp in enumerate(groups) if k in grp) for k in order) == [0, 1, 2]
        seen |= set(order)
    assert seen == set(range(6))  # every caption gets its turn over the epochs
    sampler.position(7, 0)
    again = EpochSampler(6, seed=1, groups=groups)
    again.position(7, 0)
    assert list(sampler) == list(again)  # a function of (seed, epoch) alone: resumable
    again.position(7, 1)
    assert list(again) == list(sampler)[1:]


def test_epoch_sampler_groups_by_length():
    from vlmtune.data.batching import EpochSampler

    lengths = [(i * 37) % 101 for i in range(1000)]
    sampler = EpochSampler(1000, seed=3, lengths=lengths, batch_size=4)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    span = EpochSampler.SPAN * 4
    for k in range(0, 1000, span):
        chunk = [lengths[i] for i in order[k : k + span]]
        assert chunk == sorted(chunk, reverse=True)

    def padding(o):  # padded positions over all batches of 4
        return sum(
            max(lengths[i] for i in o[b : b + 4]) * 4 - sum(lengths[i] for i in o[b : b + 4])
            for b in range(0, 1000, 4)
        )

    plain = list(EpochSampler(1000, seed=3))
    assert padding(order) < padding(plain) / 5
    sampler.position(1, 0)
    assert list(sampler) != order  # a new order each epoch
