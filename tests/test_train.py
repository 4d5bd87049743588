"""Training options that change the graph: each still trains what it should (short runs, a few steps)."""

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.config import TrainConfig
from vlmtune.finetune import train
from vlmtune.rundir import read_jsonl, read_run


def short(football, out, **kw):
    return TrainConfig(
        model="tiny",
        data=football,
        output=str(out),
        max_steps=3,
        batch_size=4,
        lr=1e-2,
        sample_every=0,
        num_samples=1,
        log_every=1,
        **kw,
    )


def adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


@pytest.mark.parametrize("options", [{}, {"gradient_checkpointing": True}], ids=["plain", "checkpointing"])
def test_lora_b_moves_from_zero(football, tmp_path, options):
    run = train(short(football, tmp_path / "run", **options))
    weights = adapter(run)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 3 * 6  # 3 OPT layers x (q, k, v, out, fc1, fc2)
    assert all(v.abs().sum() > 0 for v in lora_b)  # peft starts B at zero; gradients reached every one
    assert len([r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]) == 3


def test_train_qformer_saves_it_with_the_adapter(football, tmp_path):
    run = train(short(football, tmp_path / "run", train_qformer=True, train_projection=True))
    keys = adapter(run).keys()
    assert any(k.startswith("base_model.model.qformer.") for k in keys)
    assert any("language_projection" in k for k in keys)
    assert not any("vision_model" in k for k in keys)


def test_prompted_training_records_the_prompt(football, tmp_path):
    run = train(short(football, tmp_path / "run", prompt="a photo of"))
    assert read_run(run)["config"]["prompt"] == "a photo of"
    from vlmtune.infer import Captioner

    assert Captioner.from_run(str(run)).prompt == "a photo of"


def test_same_seed_same_adapter(football, tmp_path):
    a = adapter(train(short(football, tmp_path / "a")))
    b = adapter(train(short(football, tmp_path / "b")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
