"""The run directory's model card: the Hub's format (a YAML header it reads), how to load the adapter, how it
trained, and the evaluation's scores once `evaluate` has run; `best/` gets its own."""

import yaml
from huggingface_hub import ModelCard

from vlmtune.config import EvaluateConfig, TrainConfig
from vlmtune.evaluate import evaluate
from vlmtune.modelcard import card_text
from vlmtune.rundir import read_run
from vlmtune.training.run import train


def header(path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_train_and_evaluate_write_the_model_card(football, tmp_path):
    cfg = TrainConfig(
        model="tiny",
        data=football,
        output=str(tmp_path / "run"),
        max_steps=4,
        batch_size=8,
        val_split="validation",
        eval_every=2,
        sample_every=0,
        num_samples=0,
    )
    run = train(cfg)
    card = run / "README.md"
    meta = header(card)
    assert meta["library_name"] == "peft" and "vlmtune" in meta["tags"] and "blip-2" in meta["tags"]
    assert "base_model" not in meta  # the tiny base is a local directory, no Hub id to link
    text = card.read_text()
    assert "More Information Needed" not in text  # peft's empty template is gone
    assert f'from_pretrained("{read_run(run)["base_model"]}")' in text and "PeftModel" in text
    assert "| lora_r | `16` |" in text and "Validation loss" in text
    assert ModelCard.load(card).data.library_name == "peft"  # the Hub's own reader takes it
    assert "best adapter by val_loss" in (run / "best" / "README.md").read_text()

    evaluate(EvaluateConfig(run=str(run), data=football, limit=4))
    text = card.read_text()
    assert "## Evaluation" in text and "CIDEr-D" in text


def test_a_hub_base_and_dataset_are_named_in_the_header(tmp_path):
    info = {
        "base_model": "Salesforce/blip2-opt-2.7b",
        "family": "blip-2",
        "config": {"data": "ybelkada/football-dataset", "lora_r": 16},
        "versions": {"vlmtune": "0.1.0"},
    }
    text = card_text(tmp_path / "run", info)
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "Salesforce/blip2-opt-2.7b"
    assert meta["datasets"] == ["ybelkada/football-dataset"]
