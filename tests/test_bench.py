"""The benchmarks, briefly: bench/bench.py (every measurement runs, the seed's loop and vlmtune's both reading
the same `datasets` copy from disk, and the table ends with its ratio lines) and bench/bench_cache.py."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_prints_the_table_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench.py"),
        *("--images", "4", "--epochs", "1", "--caption-images", "4", "--caption-batch-size", "4"),
        *("--json", str(out)),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    rows = re.findall(r"^\| ((?:seed|seed-corrected|vlmtune)-(?:train|caption)) .*$", done.stdout, re.M)
    assert sorted(rows) == sorted(
        ["seed-train", "seed-corrected-train", "vlmtune-train", "seed-caption", "vlmtune-caption"]
    )
    for ratio in ("train", "caption", "train, the seed's LoRA targets", "train vs the corrected seed"):
        assert re.search(rf"^{ratio}: \d+\.\dx \(\d+\.\d\dx the work memory\)$", done.stdout, re.M), ratio
    results = json.loads(out.read_text())["results"]
    # One epoch of 4 images on each side; memory above the loaded model is a part of the peak.
    runs = ("seed-train", "seed-corrected-train", "vlmtune-train", "vlmtune-train-seed-lora")
    assert [results[k]["samples"] for k in runs] == [4, 4, 4, 4]
    assert all(0 <= r["work_gib"] <= r["peak_gib"] for r in results.values())


@pytest.mark.slow
def test_steady_state_benchmark_times_each_batch_size_and_profiles_a_step(tmp_path):
    """bench/bench_steady.py, small: a row per batch size (timed after the warm-up steps, the cache pass
    apart), then the profile of the largest."""
    out = tmp_path / "steady.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "bench_steady.py"), "--batch-sizes", "2", "4", "--warmup", "2",
        "--steps", "3", "--profile-steps", "2", "--variants", "", "lora_dropout=0", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert re.findall(r"^\| default\s+\|\s+(\d+) \|\s+[\d.]+ \|", done.stdout, re.M) == ["2", "4"]
    assert re.search(r"^lora_dropout=0, batch 4: \d+\.\d\dx the first settings$", done.stdout, re.M)
    assert "where a step goes (batch 4, 2 steady steps" in done.stdout and "aten::mm" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    # the warm-up steps and the timed ones all ran, and the feature pass was timed apart
    assert [r["steps"] for r in rows] == [5, 5, 5, 5] and all(r["cache_s"] > 0 for r in rows)


@pytest.mark.slow
def test_logits_benchmark_compares_the_three_losses():
    """bench/bench_logits.py, small: a row per way of scoring the loss, the positions each computes logits
    for (fewest in chunks: the targets alone), and each ratio against every position."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_logits.py"), "--batch-size", "2", "--steps", "1",
           "--loss-chunk", "4"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    rows = dict(
        re.findall(
            r"^\| (every position|target positions|targets, chunked)\s+\|\s+([\d.]+) \|", done.stdout, re.M
        )
    )
    assert list(rows) == ["every position", "target positions", "targets, chunked"]
    assert float(rows["targets, chunked"]) < float(rows["target positions"]) < float(rows["every position"])
    for way in ("target positions", "targets, chunked"):
        assert re.search(rf"^{way}: \d+\.\d\dx samples/s, \d+\.\d\dx peak memory$", done.stdout, re.M), way


@pytest.mark.slow
def test_the_gpu_script_runs_every_part_in_smoke_mode(tmp_path):
    """bench/gpu.sh with SMOKE=1 (the CPU proxy, a few images and steps) and every optional part: the same
    commands and settings the next lent GPU runs, so a wiring mistake costs no device time. Each part writes
    its results, and every variant row is there."""
    import os

    env = dict(os.environ, SMOKE="1", VARIANTS="1", COMPILE="1", TQDM_DISABLE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # its `python` is this one
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert set(json.loads(out.read_text())["results"]) >= {
        "seed-train",
        "seed-corrected-train",
        "vlmtune-train",
    }
    variants = {}
    for part in ("steady", "variants", "compile"):
        rows = json.loads((tmp_path / f"gpu_{part}.json").read_text())["rows"]
        assert rows and all(r.get("samples_per_s", 0) > 0 for r in rows), part
        variants[part] = {r.get("variant", "") for r in rows}
    assert len(variants["variants"]) == 3 and len(variants["compile"]) == 4, variants


@pytest.mark.slow
def test_cache_benchmark_prints_its_table():
    """bench/bench_cache.py, small: one and two processes, each tier, and two processes share one file."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_cache.py"), "--images", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    rows = re.findall(r"^\| (memory|disk) +\| +(\d) +\| +[\d.]+ \| +(\d+) \|", done.stdout, re.M)
    assert sorted(rows) == [(t, k, "1") for t in ("disk", "memory") for k in ("1", "2")]  # one file each
    assert re.search(r"^disk, 2 processes over 1: \d+\.\dx$", done.stdout, re.M)


def test_the_corrected_seed_trains_what_vlmtune_trains(tiny_path):
    """The fair baseline is fair: for the same captions it lays out the ids and labels vlmtune does (the
    image placeholders, <s>, the caption and its end; only the caption and end trained), padding aside."""
    sys.path.insert(0, str(REPO / "bench"))
    from seed_corrected import collate
    from transformers import AutoConfig, AutoProcessor

    from vlmtune.data.synthetic import examples
    from vlmtune.families import family_for

    processor, config = AutoProcessor.from_pretrained(tiny_path), AutoConfig.from_pretrained(tiny_path)
    rows = [{"image": e.image, "text": e.text} for e in examples("football", 2, 0)]
    theirs = collate(processor, config, rows)
    ours = family_for(config).encode(
        processor, [r["image"] for r in rows], ["", ""], [r["text"] for r in rows], max_length=64,
        padding_side="right",
    )  # fmt: skip
    for i in range(2):
        kept = theirs["attention_mask"][i] == 1
        assert (
            theirs["input_ids"][i][kept].tolist()
            == ours["input_ids"][i][ours["attention_mask"][i] == 1].tolist()
        )
        assert (
            theirs["labels"][i][kept].tolist() == ours["labels"][i][ours["attention_mask"][i] == 1].tolist()
        )
