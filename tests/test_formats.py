"""Every dataset layout users bring gives the same records; every kind of bad record is named."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.config import TrainConfig
from vlmtune.data import checks as datacheck
from vlmtune.data.examples import CaptionExamples
from vlmtune.data.images import to_rgb
from vlmtune.data.sources import detect, load_splits
from vlmtune.data.synthetic import examples
from vlmtune.rundir import read_jsonl
from vlmtune.training.run import train

ROWS = list(examples("football", 5, seed=11))
CAPTIONS = [[r.text, r.text.replace("player", "footballer")] for r in ROWS]  # two captions per image


def pixels(image):
    return np.asarray(image.convert("RGB")).tobytes()


def write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, r in enumerate(ROWS):
        r.image.save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


def write_format(kind: str, root: Path) -> Path:
    """The fixture builder: the same five images and ten captions in each layout."""
    if kind == "coco":
        names = write_images(root / "images")
        doc = {
            "images": [{"id": 100 + i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [
                {"id": 10 * i + j, "image_id": 100 + i, "caption": c}
                for i, caps in enumerate(CAPTIONS)
                for j, c in enumerate(caps)
            ],
        }
        (root / "annotations").mkdir()
        (root / "annotations" / "captions_train.json").write_text(json.dumps(doc))
        return root
    if kind == "jsonl":
        names = write_images(root / "pics")
        with open(root / "train.jsonl", "w") as f:
            for n, caps in zip(names, CAPTIONS, strict=True):
                for c in caps:
                    f.write(json.dumps({"image": f"pics/{n}", "text": c}) + "\n")
        return root / "train.jsonl"
    if kind == "csv":
        names = write_images(root / "pics")
        with open(root / "train.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "caption"])
            w.writerows([f"pics/{n}", c] for n, caps in zip(names, CAPTIONS, strict=True) for c in caps)
        return root / "train.csv"
    if kind == "imagefolder":
        names = write_images(root / "nested" / "deeper")
        with open(root / "metadata.jsonl", "w") as f:
            for n, caps in zip(names, CAPTIONS, strict=True):
                for c in caps:
                    f.write(json.dumps({"file_name": f"nested/deeper/{n}", "text": c}) + "\n")
        return root
    if kind == "datasets-dir":
        from datasets import Dataset

        Dataset.from_dict({"image": [r.image for r in ROWS], "text": CAPTIONS}).save_to_disk(str(root / "d"))
        return root / "d"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["coco", "jsonl", "csv", "imagefolder", "datasets-dir"])
def test_every_format_gives_the_same_records(kind, tmp_path):
    source = write_format(kind, tmp_path)
    expected_kind = {"jsonl": "manifest", "csv": "manifest"}.get(kind, kind)
    assert detect(str(source))[0] == expected_kind
    train_set, _ = load_splits(str(source))
    items = CaptionExamples(train_set)
    got = sorted((pixels(items[k]["images"][0]), items[k]["target"]) for k in range(len(items)))
    want = sorted((pixels(r.image), c) for r, caps in zip(ROWS, CAPTIONS, strict=True) for c in caps)
    assert got == want  # one training pair per caption


@pytest.mark.parametrize("kind", ["coco", "jsonl", "csv", "imagefolder", "datasets-dir"])
def test_every_format_has_a_fingerprint_that_follows_its_files(kind, tmp_path):
    """What names kept image features: the same in every load of the same files, another once an image
    changes."""
    import os

    source = write_format(kind, tmp_path)
    first, again = load_splits(str(source))[0], load_splits(str(source))[0]
    assert first._fingerprint == again._fingerprint
    if kind != "datasets-dir":  # a saved dataset holds its images; a new save_to_disk gets a new one
        image = next(tmp_path.rglob("1.png"))
        Image.new("RGB", (30, 20), "red").save(image)
        os.utime(image, ns=(1, 1))  # and its time
        assert load_splits(str(source))[0]._fingerprint != first._fingerprint


def test_coco_keeps_every_reference_per_image(tmp_path):
    train_set, _ = load_splits(str(write_format("coco", tmp_path)))
    assert len(train_set) == 5 and train_set["text"] == CAPTIONS  # one row per image, both captions
    assert len(CaptionExamples(train_set, per_image=True)) == 5
    assert len(CaptionExamples(train_set)) == 10


def test_coco_with_image_root_elsewhere(tmp_path):
    write_format("coco", tmp_path / "a")
    ann = tmp_path / "a" / "annotations" / "captions_train.json"
    moved = tmp_path / "somewhere"
    (tmp_path / "a" / "images").rename(moved)
    train_set, _ = load_splits(str(ann), image_root=str(moved))
    assert Path(train_set["image"][0]).parent == moved.resolve()


def test_vqa_manifest_puts_the_question_in_the_prompt(tmp_path, football):
    names = write_images(tmp_path / "pics")
    with open(tmp_path / "vqa.jsonl", "w") as f:
        for n in names:
            f.write(
                json.dumps({"image": f"pics/{n}", "question": "how many players?", "answer": "one"}) + "\n"
            )
    cfg = TrainConfig(
        model="tiny",
        data=str(tmp_path / "vqa.jsonl"),
        output=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        question_column="question",
        text_column="answer",
        sample_every=0,
        num_samples=0,
    )
    train_set, _ = load_splits(cfg.data, columns=("image", "answer", "question"))
    from vlmtune.data.examples import Prompting

    item = CaptionExamples(train_set, text_column="answer", prompting=Prompting(question_column="question"))[
        0
    ]
    assert item["prompt"] == "Question: how many players? Answer:" and item["target"] == "one"
    assert (train(cfg) / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ bad records


def broken_manifest(tmp_path: Path) -> Path:
    names = write_images(tmp_path / "pics")
    (tmp_path / "pics" / "truncated.png").write_bytes((tmp_path / "pics" / names[0]).read_bytes()[:200])
    (tmp_path / "pics" / "notes.png").write_text("not an image at all")
    rows = [
        {"id": "a", "image": f"pics/{names[0]}", "text": "a fine record"},
        {"id": "b", "image": "pics/missing.png", "text": "its file is missing"},
        {"id": "c", "image": "pics/truncated.png", "text": "its file is cut short"},
        {"id": "d", "image": "pics/notes.png", "text": "its file is text"},
        {"id": "e", "image": f"pics/{names[1]}", "text": "   "},
        {"id": "f", "image": f"pics/{names[2]}", "text": None},
        {"id": "a", "image": f"pics/{names[3]}", "text": "a duplicated id"},
        {"id": "g", "image": f"pics/{names[4]}", "text": "another fine record"},
    ]
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return tmp_path / "train.jsonl"


def test_each_bad_record_kind_is_named(tmp_path):
    train_set, _ = load_splits(str(broken_manifest(tmp_path)))
    bad = {b.row: b for b in datacheck.find_bad_records(train_set, "image", "text", progress=False)}
    assert sorted(bad) == [1, 2, 3, 4, 5, 6]
    assert "does not exist" in bad[1].why and bad[1].file.endswith("missing.png")
    assert "cannot be read" in bad[2].why and bad[2].file.endswith("truncated.png")
    assert "cannot be read" in bad[3].why and bad[3].file.endswith("notes.png")
    assert bad[4].field == "text" and "non-empty caption" in bad[4].why
    assert bad[5].field == "text" and "None" in bad[5].why
    assert bad[6].field == "id" and "duplicated id 'a' (first at row 0)" in bad[6].why


def test_pixel_limit(tmp_path, monkeypatch):
    import vlmtune.data.images

    monkeypatch.setattr(vlmtune.data.images, "MAX_PIXELS", 1000)  # a decompression bomb, scaled down
    from datasets import Dataset

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    ds = Dataset.from_dict({"image": [str(tmp_path / "big.png")], "text": ["x"]})
    (bad,) = datacheck.find_bad_records(ds, "image", "text", progress=False)
    assert "100x100 pixels, over the limit of 1,000 (a decompression bomb?)" in bad.why


def test_training_refuses_with_every_bad_record_listed(tmp_path, capsys):
    source = broken_manifest(tmp_path)
    code = main(["train", "--model", "tiny", "--data", str(source), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "6 bad record(s)" in err and "--skip-bad" in err
    for row in range(1, 7):
        assert f"row {row}," in err


def test_skip_bad_trains_on_the_rest(tmp_path):
    cfg = TrainConfig(
        model="tiny",
        data=str(broken_manifest(tmp_path)),
        output=str(tmp_path / "run"),
        skip_bad=True,
        max_steps=2,
        batch_size=2,
        sample_every=0,
        num_samples=0,
    )
    run = train(cfg)
    skipped = read_jsonl(run / "skipped.jsonl")
    assert sorted(r["row"] for r in skipped) == [1, 2, 3, 4, 5, 6]
    assert (run / "adapter_model.safetensors").exists()


def test_data_check_summarises_and_lists_bad_records(tmp_path, capsys):
    assert main(["data", "check", str(broken_manifest(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "detected manifest" in out and "8 records" in out and "bad records: 6" in out
    assert "caption tokens: min" in out and "width: min" in out


def test_image_modes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)  # not clipped garbage
    assert to_rgb(sixteen).info["source_mode"].startswith("I")
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    # EXIF orientation 6 (rotate 90): a 4x2 image comes out 2x4
    wide = Image.new("RGB", (4, 2))
    exif = wide.getexif()
    exif[0x0112] = 6
    import io

    buf = io.BytesIO()
    wide.save(buf, "JPEG", exif=exif)
    assert to_rgb(Image.open(io.BytesIO(buf.getvalue()))).size == (2, 4)


@pytest.mark.slow
def test_memory_stays_flat_over_many_records(tmp_path):
    """Checking and iterating 2,000 records holds no more in memory than 200 do (images are read lazily)."""
    import tracemalloc

    from datasets import Dataset
    from torch.utils.data import DataLoader

    def dataset(n):
        rows = list(examples("shapes", n, seed=n))
        path = tmp_path / f"d{n}"
        Dataset.from_dict({"image": [r.image for r in rows], "text": [r.text for r in rows]}).save_to_disk(
            str(path)
        )
        return load_splits(str(path))[0]

    def peak(ds):
        tracemalloc.start()
        assert datacheck.find_bad_records(ds, "image", "text", progress=False) == []
        seen = sum(DataLoader(CaptionExamples(ds), batch_size=16, collate_fn=len))
        assert seen == len(ds)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(dataset(200)), peak(dataset(2000))
    assert large < 2 * small + 2**20, (small, large)  # 10x the records, not 10x the memory


def test_evaluate_keeps_every_coco_reference(tmp_path):
    source = write_format("coco", tmp_path / "coco")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", "tiny", "--data", str(source), "--output", str(out)]) == 0
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["references"] for r in rows] == CAPTIONS  # both captions of every image
    # Predictions join back to the user's files and to COCO's ids, and COCO's result file is written.
    doc = json.loads((source / "annotations" / "captions_train.json").read_text())
    by_id = {im["id"]: im["file_name"] for im in doc["images"]}
    assert [Path(r["source"]).name for r in rows] == [by_id[r["image_id"]] for r in rows]
    assert sorted(r["image_id"] for r in rows) == sorted(by_id)
    results = json.loads((out / "coco_results.json").read_text())
    assert results == [{"image_id": r["image_id"], "caption": r["captions"]["base"]} for r in rows]


def test_one_caption_per_image_per_epoch(tmp_path):
    """--captions-per-epoch one: an epoch is one step per image, and across epochs each caption gets its turn."""
    from vlmtune.config import TrainConfig
    from vlmtune.rundir import read_jsonl
    from vlmtune.training.run import train

    source = write_format("coco", tmp_path / "coco")
    train_set, _ = load_splits(str(source))
    n_images = len(train_set)
    n_pairs = sum(len(t) for t in train_set["text"])
    assert n_pairs > n_images  # several captions per image, or the option would change nothing
    for mode, expected in (("all", n_pairs), ("one", n_images)):
        run = train(
            TrainConfig(
                model="tiny",
                data=str(source),
                output=str(tmp_path / mode),
                epochs=1,
                batch_size=1,
                sample_every=0,
                num_samples=0,
                captions_per_epoch=mode,
            )
        )
        timing = [r for r in read_jsonl(run / "metrics.jsonl") if "train_samples" in r][-1]
        assert timing["train_samples"] == expected, mode


@pytest.mark.parametrize("layout", ["imagefolder", "manifest"])
def test_a_caption_of_the_wrong_type_is_one_more_named_bad_record(layout, tmp_path, capsys):
    """`datasets`' JSON reader stops at a number among captions ("Column(/text) changed from string to
    number in row 13") and names nothing else; vlmtune names it and every other bad record in one report."""
    names = write_images(tmp_path)
    rows = [{"file_name": n, "text": f"caption {i}"} for i, n in enumerate(names)]
    rows[1]["file_name"] = "missing.png"
    rows[3]["text"] = 13
    rows[4]["text"] = None
    name = "metadata.jsonl" if layout == "imagefolder" else "train.jsonl"
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = str(tmp_path if layout == "imagefolder" else tmp_path / name)
    code = main(["train", "--model", "tiny", "--data", source, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "3 bad record(s)" in err, err
    assert "row 1, image" in err and "missing.png" in err and "does not exist" in err
    assert "row 3, text: expected text, got 13 (a number)" in err
    assert "row 4, text: expected a non-empty caption, got None" in err
