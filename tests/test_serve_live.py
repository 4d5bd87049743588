"""`vlmtune serve` as users run it: a real process on a loopback port, driven by the official `openai` client
and by headless Chromium on the page; several fine-tuned adapters on one base, mixed in one batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vlmtune.config import TrainConfig
from vlmtune.infer import Captioner
from vlmtune.serve.process import ServerProcess

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"  # screenshots a person can look at after CI
CHROMIUM = "/usr/bin/chromium"  # Debian's package: browsers cannot be downloaded here


def test_serve_model_tiny_answers_the_openai_client(test_images):
    """The issue's check word for word: `vlmtune serve --model tiny`, the official client, a caption back."""
    import base64

    from openai import OpenAI

    server = ServerProcess("--model", "tiny")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        uri = "data:image/png;base64," + base64.b64encode(test_images[1].read_bytes()).decode()
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}],
            max_tokens=40,
        )
        expected = Captioner.from_model("tiny").caption([Image.open(test_images[1]).convert("RGB")])[0]
        assert reply.choices[0].message.content == expected and expected
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}],
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        # A hostile request through the same client: a 4xx the client raises, and the server answers after it.
        import openai

        with pytest.raises(openai.BadRequestError, match="does not fetch URLs"):
            client.chat.completions.create(
                model="tiny",
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}],
                    }
                ],
            )
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, football) -> str:
    """A second adapter on the same base, trained briefly with a prompt of its own."""
    from vlmtune.training.run import train

    out = tmp_path_factory.mktemp("runs") / "brief"
    cfg = TrainConfig(
        model="tiny",
        data=football,
        output=str(out),
        max_steps=4,
        batch_size=8,
        lr=3e-3,
        prompt="a drawing of",
        sample_every=0,
    )
    return str(train(cfg))


@pytest.mark.slow
def test_requests_for_several_adapters_match_each_alone(demo_run, second_run, test_images):
    """Jobs for two adapters and the base, submitted together: one batch per model, each row as if alone."""
    import asyncio

    from vlmtune.serve.engine import Batcher, Engine, Job

    engine = Engine.load({"football": demo_run, "brief": second_run}, model="tiny")
    assert list(engine.adapters) == ["tiny", "football", "brief"] and engine.default.name == "football"
    images = [Image.open(p).convert("RGB") for p in test_images[:3]]
    alone = {
        "football": Captioner.from_run(demo_run).caption(images),
        "brief": Captioner.from_run(second_run).caption(images),
        "tiny": Captioner.from_model("tiny").caption(images),
    }
    assert len({tuple(v) for v in alone.values()}) == 3  # otherwise the test could not tell models apart
    names = ["football", "brief", "tiny"]
    jobs = [
        Job(im, engine.adapters[n].prompt, engine.adapters[n], 40)
        for i, im in enumerate(images)
        for n in names[i:] + names[:i]  # every image under every model, interleaved
    ]

    async def together():
        batcher = Batcher(engine, max_batch=16, max_wait_s=0.05)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(j) for j in jobs))
        finally:
            await batcher.stop()

    results = asyncio.run(together())
    for job, r in zip(jobs, results, strict=True):
        assert r.text == alone[job.adapter.name][images.index(job.images)], job.adapter.name
    assert engine.stats["batches"] == 3 and engine.stats["largest_batch"] == 3
    with pytest.raises(ValueError, match="one adapter"):
        engine.run(jobs[:2])


@pytest.fixture(scope="module")
def adapter_server(demo_run, second_run):
    server = ServerProcess("--model", "tiny", "--run", f"football={demo_run}", "--run", second_run)
    yield server
    server.stop()


@pytest.mark.slow
def test_models_list_base_and_adapters(adapter_server, second_run):
    models = httpx.get(adapter_server.url + "/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [
        ("tiny", None),
        ("football", "tiny"),
        (Path(second_run).name, "tiny"),
    ]


@pytest.mark.slow
def test_concurrent_clients_get_their_own_adapter(adapter_server, demo_run, test_images):
    """Requests sent at once, half to the adapter and half to the base, each get their model's caption."""
    import concurrent.futures

    images = [Image.open(p).convert("RGB") for p in test_images]
    want = {
        "football": Captioner.from_run(demo_run).caption(images),
        "tiny": Captioner.from_model("tiny").caption(images),
    }

    def one(i: int) -> tuple[str, int, str]:
        name = ("football", "tiny")[i % 2]
        r = httpx.post(
            adapter_server.url + "/v1/caption",
            files={"image": (test_images[i % 6].name, test_images[i % 6].read_bytes())},
            data={"model": name},
            timeout=60,
        )
        r.raise_for_status()
        return name, i % 6, r.json()["caption"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        for name, k, caption in pool.map(one, range(24)):
            assert caption == want[name][k], (name, k)
    assert httpx.get(adapter_server.url + "/health").json()["largest_batch"] > 1


def chromium_or_skip() -> None:
    if not shutil.which(CHROMIUM):
        if os.environ.get("VLMTUNE_REQUIRE_BROWSER"):  # set by `make test`, which installs it
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
        pytest.skip(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")


@pytest.mark.slow
def test_page_captions_and_answers_in_headless_chromium(adapter_server, demo_run, test_images):
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    image = test_images[2]
    expected = Captioner.from_run(demo_run).caption([Image.open(image).convert("RGB")])[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
            page.goto(adapter_server.url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length === 3")
            assert page.input_value("#model") == "football"  # the first adapter is preselected

            page.set_input_files("#file", str(image))  # picking a file
            page.wait_for_function("document.getElementById('caption').dataset.state === 'done'")
            assert page.inner_text("#caption") == expected
            assert "ms" in page.inner_text("#caption-time")

            # Two questions: the second is asked with the conversation so far (caption, question, answer).
            answered = (
                "[...document.querySelectorAll('#answers .a')].filter(a => !a.textContent.includes('…'))"
            )
            questions = ["how many players are there?", "where is the ball?"]
            for k, question in enumerate(questions):
                page.fill("#question", question)
                page.click("#ask")
                page.wait_for_function(f"{answered}.length === {k + 1}")
            answers = [a.inner_text().strip() for a in page.query_selector_all("#answers .a")]
            picture = Image.open(image).convert("RGB")
            history = [{"role": "user", "content": ""}, {"role": "assistant", "content": expected}]
            tuned = Captioner.from_run(demo_run)
            for k, question in enumerate(questions):
                history.append({"role": "user", "content": question})
                assert answers[k] == tuned.reply(picture, history, max_new_tokens=40), k
                history.append({"role": "assistant", "content": answers[k]})
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)

            # Dropping a file onto the page, with the base model chosen.
            page.select_option("#model", "tiny")
            page.wait_for_function("document.getElementById('caption').dataset.state === 'done'")
            data = list(image.read_bytes())
            page.evaluate(
                """(bytes) => {
                  const dt = new DataTransfer();
                  dt.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
                  document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt}));
                }""",
                data,
            )
            page.wait_for_function("document.getElementById('caption-time').textContent.includes('tiny')")
            base = Captioner.from_model("tiny").caption([Image.open(image).convert("RGB")])[0]
            assert page.inner_text("#caption") == base
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.slow
def test_load_script_runs_clean():
    """bench/serve_load.py, briefly: three servers, no errors, the table and both ratios printed."""
    cmd = [sys.executable, str(REPO / "bench" / "serve_load.py"), "--seconds", "1", "--clients", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "errors: 0" in out.stdout and "batching on/off at 4 clients:" in out.stdout
    assert out.stdout.count("|      0 |") == 3  # every row: zero errors


@pytest.mark.slow
def test_runs_on_another_base_are_refused_before_loading(demo_run, tmp_path):
    from vlmtune.modeling import base_of_runs
    from vlmtune.rundir import RunDirError

    with pytest.raises(RunDirError, match="different base models") as e:
        base_of_runs({"a0": demo_run}, model=str(tmp_path))
    assert demo_run in str(e.value) and str(tmp_path) in str(e.value)
