"""`vlmtune demo`: the whole job offline on a CPU in a few minutes.

1. draw the football dataset (train / validation / test) if it is not there yet;
2. `vlmtune train` the shipped tiny base on it with LoRA (configs/tiny/demo.yaml);
3. caption the test images with the base and with the fine-tuned run, side by side, with a score for each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import DemoConfig, TrainConfig, load_yaml
from .data.synthetic import write_football_dataset
from .infer import Captioner
from .metrics import exact_match, token_accuracy
from .training.run import train


def compare(run: str, dataset: Any, base_model: str = "tiny") -> dict[str, Any]:
    """Caption `dataset` (columns image/text) with the base and with `run`; per-image rows and mean scores."""
    images = [row["image"].convert("RGB") for row in dataset]
    refs = list(dataset["text"])
    base = Captioner.from_model(base_model).caption(images)
    tuned = Captioner.from_run(run).caption(images)
    rows = [
        {
            "reference": r,
            "base": b,
            "tuned": t,
            "base_exact": exact_match(b, r),
            "tuned_exact": exact_match(t, r),
            "base_token_acc": token_accuracy(b, r),
            "tuned_token_acc": token_accuracy(t, r),
        }
        for r, b, t in zip(refs, base, tuned, strict=True)
    ]
    mean = {k: sum(row[k] for row in rows) / len(rows) for k in rows[0] if k.endswith(("exact", "acc"))}
    return {"rows": rows, "mean": mean}


def _print_table(result: dict[str, Any]) -> None:
    for i, row in enumerate(result["rows"]):
        print(f"[{i:2d}] reference : {row['reference']}")
        print(
            f"     base      : {row['base']}   (exact {row['base_exact']:.0f}, tokens {row['base_token_acc']:.2f})"
        )
        print(
            f"     fine-tuned: {row['tuned']}   (exact {row['tuned_exact']:.0f}, tokens {row['tuned_token_acc']:.2f})"
        )
    m = result["mean"]
    print(f"\n{'':12}{'exact match':>14}{'token accuracy':>17}")
    print(f"{'base':12}{m['base_exact']:>14.1%}{m['base_token_acc']:>17.1%}")
    print(f"{'fine-tuned':12}{m['tuned_exact']:>14.1%}{m['tuned_token_acc']:>17.1%}")


def demo(cfg: DemoConfig) -> dict[str, Any]:
    import datasets

    data = Path(cfg.data)
    if not (data / "dataset_dict.json").exists():
        print(f"drawing the football dataset into {data} ...")
        write_football_dataset(data)
    values = load_yaml(cfg.preset, TrainConfig) | {"data": str(data), "output": cfg.output, "overwrite": True}
    run = train(TrainConfig(**values))
    test = datasets.load_from_disk(str(data))["test"]
    print(f"\ncaptions for the {len(test)} test images, base vs fine-tuned:\n")
    result = compare(str(run), test)
    _print_table(result)
    (Path(run) / "demo_comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nnext: vlmtune evaluate --run {run} --data {data} --compare base   (COCO metrics, report.html)\n"
        f"      vlmtune serve --run {run}   (an OpenAI-style API and a page at http://127.0.0.1:8000/)"
    )
    return result
