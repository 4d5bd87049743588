"""Logits over every position, over the target positions only (`Family.loss_inputs`), and the loss in chunks
of target positions (`--loss-chunk`), in the language model's training step: samples/s and peak memory, side by
side, each in a process of its own.

    python bench/bench_logits.py                 # CPU: the proxy's OPT (6 x 256) with OPT's 50,272-token vocabulary
    python bench/bench_logits.py --size real     # a GPU: OPT-2.7B dimensions

The step is what training runs with the vision side cached: image features (random, the right shape) stand in
for the Q-Former's output, so only the language model and its LoRA weights work. Batches are drawn football
captions after 32 query tokens, as in `bench/bench.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

OPT_VOCAB = 50272


WAYS = {"all": "every position", "targets": "target positions", "chunked": "targets, chunked"}


def step_loop(model_dir: str, way: str, batch_size: int, steps: int, chunk: int) -> dict:
    from bench import peak_memory, rows

    from vlmtune.config import TrainConfig
    from vlmtune.modeling import add_lora, load_base
    from vlmtune.training.loss import training_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor, family = load_base(model_dir, "auto", device=device)
    model = add_lora(model, family, TrainConfig(lora_r=16, lora_alpha=32))
    model.train()
    texts = [r["text"] for r in rows(batch_size * steps, 0)]
    d_lm = model.config.text_config.hidden_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dtype = next(p.dtype for p in model.get_base_model().language_model.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    seconds = 0.0
    for i in range(steps + 2):  # two warm-up steps, not timed
        batch = family.encode_text(
            processor, [""] * batch_size, texts[:batch_size], max_length=64, padding_side="right"
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        features = torch.randn(batch_size, model.config.num_query_tokens, d_lm, device=device, dtype=dtype)
        batch.update(family.cached_inputs(features))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            if way == "all":
                loss = model(**batch).loss
            else:  # what training runs: logits from the first target on, or the chunked loss
                loss = training_loss(model, family, batch, chunk if way == "chunked" else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            seconds += time.perf_counter() - start
    return {
        "samples_per_s": batch_size * steps / seconds,
        "peak_gib": peak_memory(device.type),
        "positions": logit_positions(family, batch, way),
    }


def logit_positions(family, batch: dict, way: str) -> float:
    """Positions per example whose logits the loss computes."""
    if way == "chunked":
        return float((batch["labels"] != -100).sum()) / batch["labels"].shape[0]
    return float((family.loss_inputs(batch) if way == "targets" else batch)["labels"].shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("proxy", "real"), default="proxy")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--loss-chunk", type=int, default=1024, help="target positions per chunk")
    ap.add_argument("--one", choices=tuple(WAYS), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(step_loop(args.model_dir, args.one, args.batch_size, args.steps, args.loss_chunk)))
        return
    from bench import build_model, machine

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        build_model(args.size, Path(model_dir), vocab_size=OPT_VOCAB)  # bench.py's shape, OPT's vocabulary
        for which in WAYS:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                which,
                "--model-dir",
                model_dir,
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--loss-chunk",
                str(args.loss_chunk),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            if proc.returncode:
                raise SystemExit(proc.stderr[-4000:])
            results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"machine: {machine()}; model: {args.size} with a {OPT_VOCAB:,}-token vocabulary; batch {args.batch_size}, "
        f"{args.steps} timed steps, vision side cached, chunks of {args.loss_chunk} target positions\n"
    )
    print("| logits over       | positions | samples/s | peak GiB |")
    print("|-------------------|----------:|----------:|---------:|")
    for which, r in results.items():
        name = WAYS[which]
        print(f"| {name:17} | {r['positions']:>9.1f} | {r['samples_per_s']:>9.1f} | {r['peak_gib']:>8.2f} |")
    a = results["all"]
    for which in ("targets", "chunked"):
        t = results[which]
        print(
            f"{WAYS[which]}: {t['samples_per_s'] / a['samples_per_s']:.2f}x samples/s, "
            f"{t['peak_gib'] / a['peak_gib']:.2f}x peak memory"
        )


if __name__ == "__main__":
    main()
