"""The image-feature cache changes where the features come from, not what the model learns."""

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune.config import TrainConfig
from vlmtune.data.synthetic import examples
from vlmtune.families import family_for
from vlmtune.rundir import read_jsonl
from vlmtune.training.run import train


def short_run(football, out, **extra):
    """Four steps on the demo data, no dropout: runs that should agree do, bit for bit."""
    settings = dict(max_steps=4, batch_size=4, lr=1e-2, lora_dropout=0.0, sample_every=0, num_samples=0)
    return train(TrainConfig(model="tiny", data=football, output=str(out), **settings | extra))


def adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


def too_big_for_memory(monkeypatch) -> list:
    """Features go to a file, as if they were too big for RAM; returns the files rows are written to."""
    import vlmtune.training.cache as cache

    files, write = [], cache.DiskFeatures.write
    monkeypatch.setattr(cache, "HOST_LIMIT", 0)
    monkeypatch.setattr(
        cache.DiskFeatures, "write", lambda self, *a: files.append(self.path) or write(self, *a)
    )
    return files


@pytest.fixture(scope="module")
def tiny(tiny_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()
    return model, AutoProcessor.from_pretrained(tiny_path), family_for(model.config)


def test_text_only_encoding_matches_the_processor(tiny):
    _, processor, family = tiny
    prompts = ["", family.format_question("what colour is the ball?"), "a photo of"]
    targets = ["a red ball", "white", "two players near the goal"]
    images = [Image.new("RGB", (30, 40))] * 3
    for side in ("right", "left"):
        full = family.encode(processor, images, prompts, targets, max_length=40, padding_side=side)
        text = family.encode_text(processor, prompts, targets, max_length=40, padding_side=side)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(full[key], text[key]), key


def test_loss_with_cached_features_equals_loss_without(tiny):
    model, processor, family = tiny
    rows = list(examples("football", 4, seed=3))
    images, texts = [r.image for r in rows], [r.text for r in rows]
    full = family.encode(processor, images, [""] * 4, texts, max_length=48, padding_side="right")
    with torch.no_grad():
        fresh = model(**full).loss
        features = family.image_features(model, full)
        assert features.shape == (4, model.config.num_query_tokens, model.config.text_config.hidden_size)
        text = family.encode_text(processor, [""] * 4, texts, max_length=48, padding_side="right")
        cached = model(**text, **family.cached_inputs(features)).loss
    torch.testing.assert_close(cached, fresh)


def test_training_with_and_without_cache_gives_the_same_adapter(football, tmp_path, capsys):
    def run(mode):
        return adapter(short_run(football, tmp_path / mode, vision_cache=mode, num_samples=1))

    cached, plain = run("auto"), run("off")
    out = capsys.readouterr().out
    assert "image feature cache: on" in out and "image feature cache: off (--vision-cache off)" in out
    assert cached.keys() == plain.keys()
    for k in cached:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trains", ["train_qformer", "train_projection"])
def test_when_the_qformer_trains_only_the_vision_encoder_is_cached(football, tmp_path, capsys, trains):
    """With the Q-Former (or the projection) training, the cache holds the frozen ViT's output and the
    trainable modules run on it each step: the same adapter, Q-Former and projection as without a cache."""

    def run(mode):
        return adapter(short_run(football, tmp_path / mode, vision_cache=mode, **{trains: True}))

    cached, plain = run("auto"), run("off")
    group = {"train_qformer": "qformer", "train_projection": "projection"}[trains]
    assert (
        f"image feature cache: on (--train-modules {group}: the frozen vision encoder"
        in capsys.readouterr().out
    )
    assert cached.keys() == plain.keys()
    assert any(("qformer" if trains == "train_qformer" else "language_projection") in k for k in cached)
    for k in cached:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-5)


def test_cache_spilled_to_disk_trains_the_same(football, tmp_path, monkeypatch):
    """Features too big for memory go to a file in the run directory, which leaves the directory as soon as
    it is open: the run trains from it, and leaves no file behind."""

    def run(name):
        return short_run(football, tmp_path / name)

    memory = run("memory")
    files = too_big_for_memory(monkeypatch)
    disk = run("disk")
    assert set(files) == {disk / "feature_cache.npy"}
    assert not list(disk.glob("feature_cache*")) and not list(memory.glob("feature_cache*"))
    a = adapter(memory)
    b = adapter(disk)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_features_round_trip_bf16(tmp_path):
    from vlmtune.training.cache import DiskFeatures

    rows = torch.randn(5, 3, 4).to(torch.bfloat16)
    store = DiskFeatures(tmp_path / "f.npy", (5, 3, 4), torch.bfloat16)
    store.write(0, rows[:2])
    store.write(2, rows[2:])
    assert torch.equal(store[torch.tensor([4, 0])], rows[[4, 0]])


def test_kept_features_are_read_by_the_next_run_on_the_same_model_and_data(
    football, tmp_path, monkeypatch, capsys
):
    """--feature-cache-dir: the first run computes and keeps the features, a second run (a sweep, a resume)
    reads them without running the vision side and trains the same adapter; other data gets a file of its
    own."""
    import vlmtune.training.cache as cache

    keep = tmp_path / "features"

    def run(name, **extra):
        return adapter(short_run(football, tmp_path / name, feature_cache_dir=str(keep), **extra))

    first = run("first")
    kept = sorted(keep.iterdir())  # the features and their images' sizes, and no temporary left behind
    assert [p.name.split(".", 1)[1] for p in kept] == ["npy", "sizes.json"]
    assert f"image features: kept in {kept[0]}" in capsys.readouterr().out

    def no_vision_pass(*args, **kwargs):
        raise AssertionError("the vision side ran although its features were kept")

    monkeypatch.setattr(cache, "build_feature_cache", no_vision_pass)
    second = run("second")
    assert f"image features: read from {kept[0]}" in capsys.readouterr().out
    assert all(torch.equal(first[k], second[k]) for k in first)

    monkeypatch.undo()
    run("held-out", val_fraction=0.25)  # other selections of the data: its training and held-out rows
    assert len(list(keep.glob("*.npy"))) == 3


def test_kept_features_too_big_for_memory_are_written_in_place(football, tmp_path, monkeypatch):
    """Beyond host memory, kept features are built in the keep directory itself under a temporary name and
    renamed when complete (no second copy from a spill file); a pass that fails leaves nothing there."""
    import vlmtune.training.cache as cache

    keep, files = tmp_path / "features", too_big_for_memory(monkeypatch)
    first = short_run(football, tmp_path / "first", feature_cache_dir=str(keep))
    (kept,) = keep.glob("*.npy")
    before = sorted(keep.iterdir())  # the features and their images' sizes
    assert {f.parent for f in files} == {keep} and all(f.name.startswith(kept.name) for f in files)
    assert not list(first.glob("feature_cache*"))
    second = short_run(football, tmp_path / "second", feature_cache_dir=str(keep))
    assert all(torch.equal(adapter(first)[k], adapter(second)[k]) for k in adapter(first))

    def interrupted(self, start, rows):
        raise KeyboardInterrupt  # a user's Ctrl-C during the pass

    monkeypatch.setattr(cache.DiskFeatures, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        short_run(football, tmp_path / "stopped", feature_cache_dir=str(keep), val_fraction=0.25)
    assert sorted(keep.iterdir()) == before


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    """A run killed while keeping features leaves its temporary file; the next run removes it, but not one
    that a live process is still writing, nor one from another machine."""
    import socket
    import subprocess
    import sys

    from vlmtune.atomic import remove_abandoned

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead, host = int(gone.stdout), socket.gethostname()
    names = [f"k.npy.{host}.{dead}.tmp", f"k.npy.{host}.{os.getpid()}.tmp", f"k.npy.elsewhere.{dead}.tmp"]
    for name in [*names, "k.npy"]:
        (tmp_path / name).write_bytes(b"x")
    remove_abandoned(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1:], "k.npy"])


def test_processes_on_one_machine_share_one_file_off_the_accelerator(monkeypatch):
    """Every process reads the whole cache: in host memory each would hold a copy, so processes that share a
    machine share one file; on an accelerator, each keeps its own copy while it is small."""
    import vlmtune.training.cache as cache

    monkeypatch.setattr(cache, "HOST_LIMIT", 100)
    monkeypatch.setattr(cache, "ON_DEVICE_LIMIT", 50)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [cache._tier(10, cpu, k) for k in (1, 2)] == ["host", "disk"]
    assert [cache._tier(200, cpu, k) for k in (1, 2)] == ["disk", "disk"]
    assert [cache._tier(10, gpu, k) for k in (1, 8)] == ["device", "device"]
    assert [cache._tier(60, gpu, k) for k in (1, 8)] == ["host", "disk"]


def test_the_store_key_follows_the_model_and_the_data(tiny, football):
    """The name of kept features changes with the model's weights, the dtype and the data, and only then."""
    from types import SimpleNamespace

    import datasets

    from vlmtune.data.batching import Collator
    from vlmtune.data.examples import CaptionExamples
    from vlmtune.training.cache import store_key

    model, processor, family = tiny
    collate = Collator(family, processor, 48)
    accelerator = SimpleNamespace(
        num_processes=1, device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False)
    )
    train_split = datasets.load_from_disk(football)["train"]
    data = CaptionExamples(train_split, per_image=True)

    def key(m=model, d=data, dtype=torch.float32):
        return store_key(m, family, collate, d, dtype, accelerator)

    assert key() == key()
    assert key(d=CaptionExamples(train_split.select(range(10)), per_image=True)) != key()
    half = AutoModelForImageTextToText.from_pretrained(model.name_or_path, dtype=torch.bfloat16).eval()
    assert key(m=half, dtype=torch.bfloat16) != key()
    changed = AutoModelForImageTextToText.from_pretrained(model.name_or_path).eval()
    with torch.no_grad():
        changed.vision_model.post_layernorm.bias.add_(0.01)
    assert key(m=changed) != key()
    assert key(d=CaptionExamples([{"image": None, "text": "x"}], per_image=True)) is None  # no fingerprint


def test_validation_reads_cached_features_too(football, tmp_path, capsys):
    """The held-out split gets a cache of its own: the validation loss is the one computed from pixels."""

    def val_loss(mode, **extra):
        settings = dict(vision_cache=mode, val_fraction=0.25, eval_every=4)
        run = short_run(football, tmp_path / mode, **settings, **extra)
        return [r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]

    cached = val_loss("auto", feature_cache_dir=str(tmp_path / "kept"))
    assert "validation image features: kept in" in capsys.readouterr().out
    plain = val_loss("off")
    assert len(cached) == 1 and cached == pytest.approx(plain, rel=1e-5)
