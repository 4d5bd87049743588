"""train -> run directory -> caption; the adapter loads with plain peft; merge loads with plain transformers.
All three give the same captions."""

import json
from pathlib import Path

import pytest

from vlmtune.cli import main
from vlmtune.rundir import read_jsonl

pytestmark = pytest.mark.slow


def test_run_directory_describes_itself(demo_run):
    run = Path(demo_run)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "vlmtune.yaml",
        "metrics.jsonl",
        "processor_config.json",
        "tokenizer.json",
    ):
        assert (run / name).exists(), name
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).is_dir()  # resolves on the machine that trained it
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] / 3, losses
    val = [r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert len(val) == 80 and val[-1] < val[0]


def cli_captions(args, capsys):
    assert main(args) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    return {Path(p).name: c for p, c in lines}


def plain_captions(model, processor, paths):
    """The seed's own inference code, on current transformers: processor(images) -> generate -> decode."""
    from PIL import Image

    out = {}
    for p in paths:
        inputs = processor(images=Image.open(p).convert("RGB"), return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=40)
        out[p.name] = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    return out


# peft 0.21's own PeftModel.from_pretrained reads a property transformers 5.24 deprecated: not vlmtune's call.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_adapter_loads_with_plain_peft_and_merge_with_plain_transformers(
    demo_run, test_images, tmp_path, capsys
):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ours = cli_captions(["caption", *map(str, test_images), "--run", demo_run, "--batch-size", "4"], capsys)
    assert len(ours) == len(test_images) and all(ours.values())

    config = PeftConfig.from_pretrained(demo_run)
    base = AutoModelForImageTextToText.from_pretrained(config.base_model_name_or_path)
    model = PeftModel.from_pretrained(base, demo_run).eval()
    processor = AutoProcessor.from_pretrained(demo_run)
    assert plain_captions(model, processor, test_images) == ours

    merged_dir = tmp_path / "merged"
    assert main(["merge", demo_run, str(merged_dir)]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert plain_captions(merged, AutoProcessor.from_pretrained(merged_dir), test_images) == ours
    # and vlmtune itself can use the merged model as a base
    assert cli_captions(["caption", *map(str, test_images), "--model", str(merged_dir)], capsys) == ours


def test_caption_writes_jsonl_and_csv(demo_run, test_images, tmp_path):
    folder = test_images[0].parent
    assert main(["caption", str(folder), "--run", demo_run, "--output", str(tmp_path / "c.jsonl")]) == 0
    rows = read_jsonl(tmp_path / "c.jsonl")
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in test_images)
    assert main(["caption", str(folder), "--run", demo_run, "--output", str(tmp_path / "c.csv")]) == 0
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[0] == "path,caption" and len(lines) == len(test_images) + 1


def test_batched_captions_equal_one_at_a_time(demo_run, test_images, capsys):
    args = ["caption", *map(str, test_images), "--run", demo_run]
    assert cli_captions(args + ["--batch-size", "6"], capsys) == cli_captions(
        args + ["--batch-size", "1"], capsys
    )


def test_beam_search_runs(demo_run, test_images, capsys):
    got = cli_captions(["caption", str(test_images[0]), "--run", demo_run, "--num-beams", "3"], capsys)
    assert list(got.values())[0]


def test_ask_uses_the_question_template(tiny_path, test_images, capsys):
    assert main(["ask", str(test_images[0]), "how many shapes are there?", "--model", "tiny"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and "Question" not in answer  # the prompt is not echoed back
