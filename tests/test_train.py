"""Training options that change the graph: each still trains what it should (short runs, a few steps)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.config import TrainConfig
from vlmtune.rundir import read_jsonl, read_run
from vlmtune.training.run import train


def short(football, out, **kw):
    defaults = dict(max_steps=3, batch_size=4, lr=1e-2, sample_every=0, num_samples=1, log_every=1)
    return TrainConfig(model="tiny", data=football, output=str(out), **(defaults | kw))


def adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_checkpointing": True}, {"group_by_length": True}],
    ids=["plain", "checkpointing", "grouped"],
)
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


@pytest.mark.slow
def test_evaluation_during_training_keeps_the_best_adapter(football, tmp_path):
    cfg = TrainConfig(
        model="tiny",
        data=football,
        output=str(tmp_path / "run"),
        val_split="validation",
        max_steps=6,
        eval_every=2,
        eval_metrics=True,
        best_metric="CIDEr-D",
        batch_size=8,
        lr=3e-3,
        sample_every=0,
        num_samples=0,
    )
    run = train(cfg)
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all("CIDEr-D" in r and "BLEU-4" in r for r in evals)
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["metric"] == "CIDEr-D" and best["CIDEr-D"] == max(r["CIDEr-D"] for r in evals)
    assert (run / "best" / "adapter_model.safetensors").exists()  # and the last one at the top level
    assert (run / "adapter_model.safetensors").exists()
    from datasets import load_from_disk

    from vlmtune.infer import Captioner

    # best/ is a run directory of its own: caption, evaluate and merge take it
    image = load_from_disk(football)["test"][0]["image"]
    assert Captioner.from_run(str(run / "best")).caption([image])[0]


def test_best_metric_needs_eval_metrics(football, tmp_path):
    from vlmtune.config import ConfigError

    with pytest.raises(ConfigError, match="--best-metric CIDEr-D needs --eval-metrics"):
        train(short(football, tmp_path / "run", val_split="validation", best_metric="CIDEr-D"))


def test_two_precisions_in_one_process(football, tmp_path):
    """The Python API (a notebook) may train twice with different dtypes; Accelerate's state must follow."""
    train(short(football, tmp_path / "fp32"))
    run = train(short(football, tmp_path / "bf16", dtype="bfloat16"))
    assert (run / "adapter_model.safetensors").exists()


def test_the_validation_split_is_written_to_the_run(football, tmp_path):
    from vlmtune.data.sources import held_out_rows

    run = train(short(football, tmp_path / "run", val_fraction=0.1, seed=5))
    doc = json.loads((run / "split.json").read_text())
    assert doc["val_rows_of_split"] == held_out_rows(240, 0.1, 5) and len(doc["val_rows_of_split"]) == 24
    assert doc["train_rows"] == 216


@pytest.mark.slow
def test_compiled_training_gives_the_same_losses(football, tmp_path):
    """--compile changes how the language model runs, not what it computes. (No dropout: compiled code draws
    its random numbers differently.) Its batches are padded to a multiple of 32 positions, so the language
    model compiles once per padded shape (here one: every batch pads to 64), static; unpadded, a second
    length recompiles it. The sample captions at the end run eagerly (each decoding length would compile)."""
    from torch._dynamo.utils import counters

    losses, graphs, samples = {}, {}, {}
    for name, extra in (("eager", {}), ("compiled", {"compile": True}),
                        ("unpadded", {"compile": True, "pad_to_multiple_of": 0})):  # fmt: skip
        torch._dynamo.reset()
        counters.clear()
        run = train(short(football, tmp_path / name, lora_dropout=0.0, max_steps=6, **extra))
        losses[name] = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        graphs[name] = counters["stats"]["unique_graphs"]
        samples[name] = [r["caption"] for r in read_jsonl(run / "samples.jsonl")]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert samples["compiled"] == samples["eager"] and samples["eager"]  # generated eagerly: no graph counted
    assert losses["unpadded"] == pytest.approx(losses["eager"], rel=1e-4)
    assert graphs == {"eager": 0, "compiled": 1, "unpadded": 2}


def test_replacing_a_directory_never_leaves_the_target_without_a_complete_version(tmp_path):
    """What `merge --overwrite` does: a watcher polling the target sees a complete version at every moment."""
    import threading

    from vlmtune.atomic import replace_dir

    target = tmp_path / "merged"
    missing, done = [], threading.Event()

    def watch():
        while not done.is_set():
            if not (target / "config.json").exists() or not (target / "model.safetensors").exists():
                missing.append(1)

    for version in range(60):
        new = tmp_path / "merged.tmp"
        new.mkdir()
        (new / "config.json").write_text(str(version))
        (new / "model.safetensors").write_text(str(version))
        replace_dir(new, target)
        if version == 0:
            thread = threading.Thread(target=watch)
            thread.start()
        assert (target / "config.json").read_text() == str(version) and not new.exists()
    done.set()
    thread.join()
    assert not missing and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_sharded_engines_are_refused_before_the_weights_load(football, tmp_path, monkeypatch):
    """FSDP and DeepSpeed launches (which Accelerate allows on GPUs only, so none can run here) stop with what
    to do instead, before the base loads: not a hang at the first save."""
    import accelerate
    from accelerate.utils import DistributedType

    import vlmtune.training.run as run_module
    from vlmtune.config import ConfigError

    loaded = []
    monkeypatch.setattr(run_module, "load_base", lambda *a, **k: loaded.append(a))
    for engine in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self, e=engine: e))
        with pytest.raises(ConfigError, match=f"asks for {engine.value}.*torchrun"):
            train(TrainConfig(model="tiny", data=football, output=str(tmp_path / "run"), max_steps=1))
    assert loaded == []
    for fine in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        run_module.validate_engine(fine)


def test_lm_dropout_replaces_the_language_models_own(tiny_path):
    """--lm-dropout sets the language model's dropout (the tiny base's is 0): the training forward is then
    noisy, and with the checkpoint's own 0 it repeats exactly."""
    from PIL import Image

    from vlmtune.config import TrainConfig
    from vlmtune.errors import ConfigError
    from vlmtune.modeling import load_base

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    losses = {}
    for p in (None, 0.3):
        model, processor, family = load_base(tiny_path, "float32", device=torch.device("cpu"), lm_dropout=p)
        assert family.language_model(model).config.dropout == (p or 0.0)
        batch = family.encode(
            processor, [image] * 2, ["", ""], ["a red ball"] * 2, max_length=32, padding_side="right"
        )
        model.train()
        with torch.no_grad():
            losses[p] = [model(**batch).loss.item() for _ in range(2)]
    assert losses[None][0] == losses[None][1]
    assert losses[0.3][0] != losses[0.3][1]
    with pytest.raises(ConfigError, match=r"--lm-dropout must be in \[0, 1\)"):
        train(TrainConfig(model=tiny_path, data="unused", lm_dropout=1.5))


def test_lora_dtype_base_keeps_the_adapter_in_the_bases_dtype(football, tmp_path):
    """Over a bf16 base the adapter trains in fp32 by default (peft casts each wrapped layer's input up to meet
    it); --lora-dtype base keeps it in bf16, no casts. Both train: the first step is the same (LoRA's B starts
    at zero), and every B moves."""
    runs = {
        d: train(short(football, tmp_path / d, dtype="bfloat16", lora_dtype=d)) for d in ("float32", "base")
    }
    assert {d: {w.dtype for w in adapter(r).values()} for d, r in runs.items()} == {
        "float32": {torch.float32},
        "base": {torch.bfloat16},
    }
    first = {d: read_jsonl(r / "metrics.jsonl")[0]["loss"] for d, r in runs.items()}
    assert first["base"] == first["float32"]
    for run in runs.values():
        assert all(v.abs().sum() > 0 for k, v in adapter(run).items() if "lora_B" in k)


def test_fixed_shapes_are_refused_where_they_cannot_apply(football, tmp_path):
    from vlmtune.errors import ConfigError

    for extra, said in (
        ({"pad_to_multiple_of": -1}, "--pad-to-multiple-of must be 0"),
        (
            {"pad_to_multiple_of": 32, "packing": True},
            "--pad-to-multiple-of pads unpacked rows, and --packing",
        ),
        ({"compile_mode": "reduce-overhead"}, "--compile-mode reduce-overhead needs --compile"),
    ):
        with pytest.raises(ConfigError, match=said):
            train(short(football, tmp_path / "run", **extra))


def test_padded_batches_train_the_same(football, tmp_path):
    """--pad-to-multiple-of without compiling: every batch padded to 64 positions, the same losses."""
    losses = {}
    for name, multiple in (("longest", 0), ("padded", 64)):
        run = train(short(football, tmp_path / name, lora_dropout=0.0, pad_to_multiple_of=multiple))
        losses[name] = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses["padded"] == pytest.approx(losses["longest"], rel=1e-5)
