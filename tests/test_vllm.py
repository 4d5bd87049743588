"""--engine vllm: vLLM generates what transformers does, from the same prompt ids, for captions, evaluation and
the server. vLLM pins its own torch and transformers, so it runs in an environment of its own (`make
vllm-env`, vLLM's CPU build here; `make test` builds it where it can); these tests skip, saying so, without it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from vlmtune.cli import main

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("VLMTUNE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"no vLLM environment at {VLLM_PYTHON}: `make vllm-env` builds it (vLLM's CPU build)",
)


def in_vllm_env(*args: str) -> str:
    """`args` run by the vLLM environment's python (offline, a small KV cache on the CPU); its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    done = subprocess.run([str(VLLM_PYTHON), *args], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return done.stdout


def captions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_vllm
@pytest.mark.slow
def test_captions_and_evaluation_agree_on_both_engines(demo_run, test_images, football, tmp_path):
    images = [str(p) for p in test_images]
    for name, source in (("base", ["--model", "tiny"]), ("run", ["--run", demo_run])):
        got = {}
        for engine in ("transformers", "vllm"):
            out = tmp_path / f"{name}-{engine}.jsonl"
            in_vllm_env("-m", "vlmtune", "caption", *images, *source, "--engine", engine, "--dtype", "float32",
                        "--output", str(out))  # fmt: skip
            got[engine] = captions(out)
        assert got["vllm"] == got["transformers"], name
    assert len({c["caption"] for c in got["vllm"]}) > 1  # the run's captions follow the images
    reports = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / f"eval-{engine}"
        in_vllm_env("-m", "vlmtune", "evaluate", "--run", demo_run, "--data", football, "--limit", "8",
                    "--engine", engine, "--dtype", "float32", "--output", str(out))  # fmt: skip
        reports[engine] = json.loads((out / "metrics.json").read_text())["metrics"]
        reports[engine + " captions"] = [
            r["captions"] for r in map(json.loads, (out / "predictions.jsonl").open())
        ]
    assert reports["vllm captions"] == reports["transformers captions"]
    assert reports["vllm"] == reports["transformers"]


@needs_vllm
@pytest.mark.slow
def test_the_server_engine_answers_alike_on_vllm(demo_run, test_images):
    """Captions, an answer, a streamed reply and the bare base through one server engine on each."""
    out = json.loads(in_vllm_env(str(REPO / "tests" / "vllm_worker.py"), demo_run, *map(str, test_images[:3]))
                     .strip().splitlines()[-1])  # fmt: skip
    assert out["vllm"]["results"] == out["transformers"]["results"]
    assert out["vllm"]["streamed"] == out["transformers"]["streamed"] != ""
    assert 1 <= out["vllm"]["sampled"] <= 8  # sampling runs too (its tokens are the sampler's own)


def test_vllm_is_asked_for_by_name_where_it_is_missing_or_cannot_serve(tmp_path, test_images, capsys):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed in this environment")
    except ImportError:
        pass
    assert main(["caption", str(test_images[0]), "--model", "tiny", "--engine", "vllm"]) == 2
    assert "--engine vllm needs vLLM" in capsys.readouterr().err
    from tiny_families import BUILDERS

    qwen = BUILDERS["qwen2-vl"](tmp_path / "qwen")
    assert main(["caption", str(test_images[0]), "--model", str(qwen), "--engine", "vllm"]) == 2
    assert "--engine vllm: qwen-vl is not fed to vLLM yet" in capsys.readouterr().err
