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
    rows = re.findall(r"^\| (seed|vlmtune)-(train|caption) .*$", done.stdout, re.M)
    assert sorted(rows) == sorted([(s, t) for s in ("seed", "vlmtune") for t in ("train", "caption")])
    assert re.search(r"^train: \d+\.\dx$", done.stdout, re.M)
    assert re.search(r"^caption: \d+\.\dx$", done.stdout, re.M)
    assert re.search(r"^train, the seed's LoRA targets: \d+\.\dx$", done.stdout, re.M)
    results = json.loads(out.read_text())["results"]
    # One epoch of 4 images on each side; memory above the loaded model is a part of the peak.
    trained = [results[k]["samples"] for k in ("seed-train", "vlmtune-train", "vlmtune-train-seed-lora")]
    assert trained == [4, 4, 4]
    assert all(0 <= r["work_gib"] <= r["peak_gib"] for r in results.values())


@pytest.mark.slow
def test_cache_benchmark_prints_its_table():
    """bench/bench_cache.py, small: one and two processes, each tier, and two processes share one file."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_cache.py"), "--images", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    rows = re.findall(r"^\| (memory|disk) +\| +(\d) +\| +[\d.]+ \| +(\d+) \|", done.stdout, re.M)
    assert sorted(rows) == [(t, k, "1") for t in ("disk", "memory") for k in ("1", "2")]  # one file each
    assert re.search(r"^disk, 2 processes over 1: \d+\.\dx$", done.stdout, re.M)
