"""`vlmtune serve` in process (FastAPI's test client): the OpenAI API, the multipart endpoints, adapters chosen
per request and batched together, streaming, the API key, and hostile input, after which it still serves."""

import asyncio
import base64
import dataclasses
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vlmtune.config import ConfigError, ServeConfig
from vlmtune.infer import Captioner
from vlmtune.serve import build
from vlmtune.serve.app import create_app
from vlmtune.serve.engine import Batcher, Job, Sampling, parse_runs


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat(image: bytes, text: str | None = None, **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_uri(image)}}]
    if text:
        content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}], **kw}


@pytest.fixture(scope="module")
def base_app():
    return build(ServeConfig(model="tiny"))


@pytest.fixture(scope="module")
def client(base_app):
    with TestClient(base_app) as c:
        yield c


@pytest.fixture(scope="module")
def picture(test_images) -> bytes:
    return test_images[0].read_bytes()


@pytest.fixture(scope="module")
def base_captioner():
    return Captioner.from_model("tiny")


def test_models_and_health(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"


def test_chat_caption_is_vlmtune_caption(client, picture, test_images, base_captioner):
    body = client.post("/v1/chat/completions", json=chat(picture, model="tiny")).json()
    expected = base_captioner.caption([Image.open(test_images[0]).convert("RGB")])[0]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] > 0
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


def test_text_part_is_the_question(client, picture, test_images, base_captioner):
    body = client.post("/v1/chat/completions", json=chat(picture, "how many players?")).json()
    image = Image.open(test_images[0]).convert("RGB")
    expected = base_captioner.answer([image], ["how many players?"], max_new_tokens=40)[0]
    assert body["choices"][0]["message"]["content"] == expected
    ask = client.post("/v1/ask", files={"image": ("x.png", picture)}, data={"question": "how many players?"})
    assert ask.status_code == 200 and ask.json()["answer"] == expected


def test_multipart_caption_reports_time(client, picture, base_captioner, test_images):
    body = client.post("/v1/caption", files={"image": ("x.png", picture, "image/png")}).json()
    assert body["caption"] == base_captioner.caption([Image.open(test_images[0]).convert("RGB")])[0]
    assert body["model"] == "tiny" and body["seconds"] > 0


def test_max_tokens_and_n(client, picture):
    body = client.post("/v1/chat/completions", json=chat(picture, max_tokens=2, n=3)).json()
    assert len(body["choices"]) == 3
    for c in body["choices"]:
        assert c["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6
    sampled = client.post("/v1/chat/completions", json=chat(picture, temperature=1.0, top_p=0.9, n=2))
    assert sampled.status_code == 200 and len(sampled.json()["choices"]) == 2


def sse(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_pieces_join_into_the_whole_reply(client, picture):
    whole = client.post("/v1/chat/completions", json=chat(picture, n=2)).json()
    with client.stream("POST", "/v1/chat/completions", json=chat(picture, n=2, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.read().decode())
    text, finish = {0: "", 1: ""}, {}
    for e in events:
        assert e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"]
        (c,) = e["choices"]
        text[c["index"]] += c["delta"].get("content", "")
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert sum(1 for e in events if e["choices"][0]["delta"].get("content")) > 4  # pieces, not one blob
    for c in whole["choices"]:
        assert text[c["index"]] == c["message"]["content"]
        assert finish[c["index"]] == c["finish_reason"]


def test_docs_and_page_are_served_without_a_cdn(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "http" not in page.text.split("<body>")[0]
    assert client.get("/static/app.js").status_code == 200


def bomb() -> bytes:
    """A 12,000 x 12,000 PNG (144 megapixels) of a few kilobytes."""
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    return buf.getvalue()


def truncated_jpeg(picture: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(picture)).convert("RGB").resize((256, 256)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


HOSTILE = {
    "not an image": (b"%PDF-1.4 this is not a picture", 400, "not an image"),
    "zero bytes": (b"", 400, "empty"),
    "truncated JPEG": ("truncated", 400, "truncated"),
    "decompression bomb": ("bomb", 413, "over the limit"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_uploads_get_4xx_and_the_server_goes_on(client, picture, kind):
    data, status, words = HOSTILE[kind]
    data = {"truncated": lambda: truncated_jpeg(picture), "bomb": bomb}.get(data, lambda: data)()
    for r in (
        client.post("/v1/caption", files={"image": ("photo.jpg", data, "image/jpeg")}),
        client.post("/v1/chat/completions", json=chat(data)),
    ):
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200
    assert client.post("/v1/caption", files={"image": ("ok.png", picture)}).status_code == 200


def test_oversize_bodies_get_413(client, picture):
    big = b"\0" * (21 * 2**20)  # the default limit is 20 MiB
    r = client.post("/v1/caption", files={"image": ("big.png", big)})
    assert r.status_code == 413 and "MiB" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted while the body streams in
        for _ in range(21):
            yield b"\0" * 2**20

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "request_, status, words",
    [
        (lambda p: ("/v1/ask", {"files": {"image": ("x.png", p)}}), 400, "question"),
        (lambda p: ("/v1/caption", {"data": {"model": "tiny"}}), 400, "image"),
        (lambda p: ("/v1/chat/completions", {"json": {"model": "tiny"}}), 400, "messages"),
        (lambda p: ("/v1/chat/completions", {"json": chat(p, model="gpt-4o")}), 404, "GET /v1/models"),
        (lambda p: ("/v1/chat/completions", {"json": chat(p, n=9)}), 400, "limit"),
        (lambda p: ("/v1/chat/completions", {"json": chat(p, max_tokens=10_000)}), 400, "limit"),
        (
            lambda p: ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}]}}),
            400,
            "no image",
        ),
    ],
    ids=[
        "no question",
        "no image field",
        "no messages",
        "unknown model",
        "n too large",
        "too many tokens",
        "no image part",
    ],
)
def test_bad_requests_say_what_is_wrong(client, picture, request_, status, words):
    path, kwargs = request_(picture)
    r = client.post(path, **kwargs)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert set(r.json()["error"]) == {"message", "type", "code"}


@pytest.mark.parametrize(
    "url, words",
    [
        ("https://example.com/cat.jpg", "does not fetch URLs"),
        ("http://169.254.169.254/latest/meta-data", "does not fetch URLs"),
        ("file:///etc/passwd", "data URI"),
        ("data:image/png;base64,@@@not-base64@@@", "invalid base64"),
        ("data:image/png,rawbytes", "base64"),
    ],
)
def test_image_urls_are_never_fetched(client, url, words):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_two_images_are_refused(client, picture):
    body = chat(picture)
    body["messages"][0]["content"].append({"type": "image_url", "image_url": data_uri(picture)})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "takes at most 1 per conversation" in r.json()["error"]["message"]


def test_api_key_guards_every_route_but_health(base_app, picture):
    engine = base_app.state.batcher.engine
    with TestClient(create_app(engine, ServeConfig(model="tiny"), api_key="s3cret")) as c:
        health = c.get("/health")
        assert health.status_code == 200 and "tiny" not in health.text  # open, so it names no model
        for path in ("/v1/models", "/", "/docs", "/openapi.json", "/static/app.js"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
        assert c.get("/").headers["www-authenticate"].startswith("Basic")  # a browser asks for it
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/", auth=("anyone", "s3cret")).status_code == 200
        r = c.post(
            "/v1/caption", files={"image": ("x.png", picture)}, headers={"Authorization": "Bearer s3cret"}
        )
        assert r.status_code == 200


def test_a_slow_request_gets_504_and_the_next_is_served(base_app, picture):
    engine = base_app.state.batcher.engine
    with TestClient(create_app(engine, ServeConfig(model="tiny", timeout=1e-4))) as c:
        r = c.post("/v1/caption", files={"image": ("x.png", picture)})
        assert r.status_code == 504 and "--timeout" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


def test_a_failing_batch_gives_500_and_the_server_goes_on(base_app, picture, monkeypatch):
    engine = base_app.state.batcher.engine
    real, calls = engine.run, []

    def fail_once(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(jobs)

    monkeypatch.setattr(engine, "run", fail_once)
    with TestClient(create_app(engine, ServeConfig(model="tiny"))) as c:
        r = c.post("/v1/caption", files={"image": ("x.png", picture)})
        assert r.status_code == 500 and "device-side assert" in r.json()["error"]["message"]
        assert c.post("/v1/caption", files={"image": ("x.png", picture)}).status_code == 200


def test_concurrent_requests_share_a_batch(base_app, test_images, base_captioner):
    """Jobs that arrive together run as one generate call and give what each gives alone."""
    engine = base_app.state.batcher.engine
    images = [Image.open(p).convert("RGB") for p in test_images]
    alone = [base_captioner.caption([im])[0] for im in images]

    async def together():
        batcher = Batcher(engine, max_batch=16, max_wait_s=0.05)
        batcher.start()
        futures = [batcher.submit(Job(im, "", engine.default, 40)) for im in images]
        try:
            return await asyncio.gather(*futures)
        finally:
            await batcher.stop()

    before = dict(engine.stats)
    results = asyncio.run(together())
    assert [r.text for r in results] == alone
    assert engine.stats["batches"] - before["batches"] == 1
    assert engine.stats["largest_batch"] >= len(images)


def test_serve_config_is_checked():
    with pytest.raises(ConfigError, match="--run RUN_DIR"):
        build(ServeConfig())
    with pytest.raises(ConfigError, match="--max-batch"):
        build(dataclasses.replace(ServeConfig(model="tiny"), max_batch=0))
    assert parse_runs(["a=/x/one", "/y/two/"]) == {"a": "/x/one", "two": "/y/two/"}
    with pytest.raises(ValueError, match="two runs are named"):
        parse_runs(["/x/same", "/y/same"])


def test_sampling_settings_split_batches():
    assert Sampling().generate_kwargs() == {"do_sample": False}
    assert Sampling(0.7, 0.9).generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert len({Sampling(), Sampling(0.0, 1.0), Sampling(0.7)}) == 2


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("VLMTUNE_API_KEY", "from-env")
    with TestClient(build(ServeConfig(model="tiny"))) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
