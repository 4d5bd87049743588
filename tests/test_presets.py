"""Every shipped YAML preset is a valid `vlmtune train --config`."""

from pathlib import Path

import pytest

from vlmtune.cli import parse
from vlmtune.config import TrainConfig

PRESETS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_there_are_presets():
    assert {p.parent.name for p in PRESETS} >= {"tiny", "blip2-opt-2.7b"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_preset_parses(preset):
    name, cfg = parse(["train", "--config", str(preset)])
    assert isinstance(cfg, TrainConfig)
    # the header shows how to launch it
    assert "vlmtune train --config " + str(preset.relative_to(preset.parents[2])) in preset.read_text()
