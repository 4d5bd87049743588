"""Every shipped YAML preset is a valid `vlmtune train --config`."""

from pathlib import Path

import pytest

from vlmtune.cli import parse
from vlmtune.config import TrainConfig
from vlmtune.families import FAMILIES

PRESETS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_there_are_presets():
    assert {p.parent.name for p in PRESETS} >= {"tiny", "blip2-opt-2.7b"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_preset_parses(preset):
    name, cfg = parse(["train", "--config", str(preset)])
    assert isinstance(cfg, TrainConfig)
    # the header shows how to launch it
    assert "vlmtune train --config " + str(preset.relative_to(preset.parents[2])) in preset.read_text()


@pytest.mark.parametrize(
    "preset", [p for p in PRESETS if p.parent.name != "tiny"], ids=lambda p: p.parent.name
)
def test_each_preset_names_a_checkpoint_its_family_was_written_for(preset):
    _, cfg = parse(["train", "--config", str(preset)])
    assert any(cfg.model in f.hub_ids for f in FAMILIES), cfg.model
