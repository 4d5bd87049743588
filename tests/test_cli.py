"""The command line: help for every command, and a clear error (exit 2, no traceback) for each mistake."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from vlmtune.cli import COMMANDS, main, parse
from vlmtune.config import TrainConfig


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "vlmtune", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: vlmtune " + command in out.stdout
    assert COMMANDS[command][0].__doc__.split()[0] in out.stdout


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "vlmtune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)


def test_flags_override_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: tiny\nepochs: 3\nlora_r: 4\n")
    name, cfg = parse(["train", "--config", str(preset), "--epochs", "7", "--no-train-qformer"])
    assert name == "train" and isinstance(cfg, TrainConfig)
    assert (cfg.model, cfg.epochs, cfg.lora_r, cfg.train_qformer) == ("tiny", 7, 4, False)
    assert cfg.batch_size == TrainConfig().batch_size


def test_unknown_preset_key_is_named(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("lora_rank: 4\n")
    with pytest.raises(ValueError, match="unknown option 'lora_rank'"):
        parse(["train", "--config", str(preset)])


@pytest.mark.parametrize(
    "args, says",
    [
        (["train", "--lora-rank", "4"], "unrecognized arguments: --lora-rank"),
        (["train", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["train", "--epochs", "three"], "invalid int value: 'three'"),
        (["caption"], "the following arguments are required: IMAGES"),
    ],
)
def test_bad_option(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_every_config_problem_in_one_error(tmp_path, capsys):
    code = main(
        [
            "train",
            "--model",
            "tiny",
            "--epochs",
            "0",
            "--lr",
            "-1",
            "--lora-dropout",
            "1.5",
            "--output",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    for says in ("--epochs must be at least 1", "--lr must be positive", "--lora-dropout must be in [0, 1)"):
        assert says in err
    assert "Traceback" not in err


def test_missing_image(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nope.png"), "--model", "tiny"]) == 2
    assert f"image {tmp_path / 'nope.png'} does not exist" in capsys.readouterr().err


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["ask", str(bad), "what is it?", "--model", "tiny"]) == 2
    assert "bad.jpg cannot be read" in capsys.readouterr().err


def test_missing_column(football, tmp_path, capsys):
    code = main(
        [
            "train",
            "--model",
            "tiny",
            "--data",
            football,
            "--text-column",
            "caption",
            "--output",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "no column 'caption'" in err and "its columns: image, text" in err and "--text-column" in err


def test_missing_split(football, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--model",
                "tiny",
                "--data",
                football,
                "--val-split",
                "dev",
                "--output",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "no split 'dev'" in capsys.readouterr().err


def test_unreachable_hub_model_says_how_to_use_a_local_copy(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["caption", str(image), "--model", "Salesforce/blip2-opt-2.7b"]) == 2
    err = capsys.readouterr().err
    assert "'Salesforce/blip2-opt-2.7b'" in err and "--model DIR" in err and "hf download" in err


def test_unreachable_hub_dataset_says_how_to_use_a_local_copy(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--model",
                "tiny",
                "--data",
                "ybelkada/football-dataset",
                "--output",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "'ybelkada/football-dataset'" in err and "--data DIR" in err and "save_to_disk" in err


def test_run_directory_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    assert main(["train", "--model", "tiny", "--output", str(run)]) == 2
    assert "already holds a trained adapter or checkpoints; pass --resume auto" in capsys.readouterr().err
    assert (run / "adapter_config.json").read_text() == "{}"


def test_not_a_run_directory(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["caption", str(image), "--run", str(tmp_path)]) == 2
    assert "is not a finished vlmtune run directory" in capsys.readouterr().err


def test_run_or_model_not_both(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["caption", str(image)]) == 2
    assert "exactly one of --run RUN_DIR or --model MODEL" in capsys.readouterr().err


def test_models_lists_every_family_with_what_it_reads(capsys):
    from vlmtune.families import FAMILIES

    assert main(["models", "--json"]) == 0
    table = {row["family"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(table) == [f.name for f in FAMILIES]
    assert table["blip-2"]["images"] == "one" and table["qwen-vl"]["images"] == "several"
    assert "deepstack" in table["qwen-vl"]["cache"]  # the cache each family keeps, from the family itself
