"""`vlmtune evaluate`: base and fine-tuned in one table, and files a person and a program can read."""

import json

import pytest

from vlmtune.cli import main
from vlmtune.metrics import CAPTION_METRICS, java_available
from vlmtune.rundir import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(demo_run, football, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert (
        main(["evaluate", "--run", demo_run, "--data", football, "--compare", "base", "--output", str(out)])
        == 0
    )
    return out


def test_metrics_json(evaluated):
    summary = json.loads((evaluated / "metrics.json").read_text())
    assert summary["split"] == "validation" and summary["images"] == 24
    expected = set(CAPTION_METRICS) if java_available() else set(CAPTION_METRICS) - {"METEOR"}
    assert list(summary["metrics"]) == ["base", "fine-tuned"]
    for scores in summary["metrics"].values():
        assert set(scores) == expected
    assert summary["metrics"]["fine-tuned"]["CIDEr-D"] > summary["metrics"]["base"]["CIDEr-D"] + 1.0
    assert summary["metrics"]["fine-tuned"]["BLEU-4"] > 0.5 > summary["metrics"]["base"]["BLEU-4"]
    assert summary["versions"]["transformers"] and summary["tokenizer"] and summary["metric_implementation"]


def test_predictions_and_report_hold_every_image(evaluated):
    rows = read_jsonl(evaluated / "predictions.jsonl")
    assert len(rows) == 24
    html = (evaluated / "report.html").read_text()
    md = (evaluated / "report.md").read_text()
    for row in rows:
        assert (evaluated / row["image"]).exists()
        assert f'src="{row["image"]}"' in html and f"]({row['image']})" in md
        assert set(row["captions"]) == {"base", "fine-tuned"} and row["references"]
    assert (evaluated / "loss.svg").read_text().startswith("<svg") and 'src="loss.svg"' in html


def test_evaluate_a_base_model_alone(football, tmp_path, capsys):
    out = tmp_path / "e"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "tiny",
                "--data",
                football,
                "--split",
                "test",
                "--limit",
                "4",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["images"] == 4 and list(summary["metrics"]) == ["base"]
    assert not (out / "loss.svg").exists()  # no run, no loss curve
    assert "CIDEr-D" in capsys.readouterr().out


def test_compare_base_needs_a_run(football, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                "tiny",
                "--data",
                football,
                "--compare",
                "base",
                "--output",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "--compare base needs --run" in capsys.readouterr().err


def test_vqa_evaluation(tmp_path, capsys):
    """Questions about drawn shapes, which the tiny base was pretrained to answer: VQA accuracy + exact match."""
    from vlmtune.data.synthetic import examples

    (tmp_path / "pics").mkdir()
    with open(tmp_path / "vqa.jsonl", "w") as f:
        for i, r in enumerate(examples("shapes", 12, seed=55)):
            r.image.save(tmp_path / "pics" / f"{i}.png")
            q, a = r.qa[0]  # "how many shapes are there?"
            f.write(
                json.dumps({"image": f"pics/{i}.png", "question": q, "answers": [a] * 9 + ["many"]}) + "\n"
            )
    out = tmp_path / "e"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "tiny",
                "--data",
                str(tmp_path / "vqa.jsonl"),
                "--question-column",
                "question",
                "--text-column",
                "answers",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    scores = json.loads((out / "metrics.json").read_text())["metrics"]["base"]
    assert set(scores) == {"VQA accuracy", "exact match"}
    assert scores["VQA accuracy"] > 0.8, scores  # the base answers these (pretrained on them)
    rows = read_jsonl(out / "predictions.jsonl")
    assert rows[0]["question"] == "how many shapes are there?"
    assert "how many shapes are there?" in (out / "report.html").read_text()
