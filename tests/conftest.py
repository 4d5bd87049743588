"""Shared fixtures. Everything here is offline: the hub is switched off before transformers is imported."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from vlmtune.config import TrainConfig, load_yaml  # noqa: E402
from vlmtune.modeling import TINY_PATH  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_PRESET = os.path.join(REPO, "configs", "tiny", "demo.yaml")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_path() -> str:
    assert (TINY_PATH / "model.safetensors").exists(), "the tiny base is missing: run `make tiny-base`"
    return str(TINY_PATH)


@pytest.fixture(scope="session")
def football(tmp_path_factory) -> str:
    """The demo dataset, drawn once per test session."""
    from vlmtune.data.synthetic import write_football_dataset

    return str(write_football_dataset(tmp_path_factory.mktemp("data") / "football"))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, football) -> str:
    """A run of the demo preset exactly as `make demo` trains it (about a minute and a half on 2 cores)."""
    from vlmtune.training.run import train

    out = tmp_path_factory.mktemp("runs") / "demo"
    values = load_yaml(DEMO_PRESET, TrainConfig) | {"data": football, "output": str(out), "sample_every": 0}
    return str(train(TrainConfig(**values)))


@pytest.fixture(scope="session")
def test_images(football, tmp_path_factory) -> list:
    """Six held-out football drawings as PNG files."""
    from datasets import load_from_disk

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, row in enumerate(load_from_disk(football)["test"].select(range(6))):
        p = folder / f"test_{i:02d}.png"
        row["image"].save(p)
        paths.append(p)
    return paths
