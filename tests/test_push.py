"""`vlmtune push RUN_DIR REPO_ID`, up to the requests it sends: no Hub is reachable here, so a stand-in on
loopback answers the Hub's API (create the repo, the pre-upload check, the commit) and the test reads what
arrived. It asks for every file inline (the real Hub sends large binaries through LFS instead, which the
huggingface_hub library does; not exercised here)."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlmtune.cli import main
from vlmtune.config import TrainConfig
from vlmtune.training.run import train


class FakeHub(BaseHTTPRequestHandler):
    requests: list = []

    def _reply(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append((self.path, self.headers.get("Authorization"), body))
        here = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            self._reply({"url": f"{here}/{json.loads(body)['organization']}/{json.loads(body)['name']}"})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                }
            )
        elif self.path == "/api/validate-yaml":
            self._reply({})
        else:  # the commit
            self._reply({"commitUrl": f"{here}/me/football/commit/{'a' * 40}", "commitOid": "a" * 40})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest switches the Hub off
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_push_sends_the_run_directory_without_checkpoints_or_caches(football, tmp_path, hub):
    run = train(
        TrainConfig(
            model="tiny",
            data=football,
            output=str(tmp_path / "football"),
            max_steps=2,
            batch_size=4,
            save_every=1,
            sample_every=0,
            num_samples=0,
        )
    )
    assert (run / "checkpoints").is_dir()
    (run / "feature_cache.npy").write_bytes(b"\0" * 64)  # what a run may leave that is of no use elsewhere

    argv = ["push", str(run), "me/football", "--private", "--token", "hf_test", "--endpoint", hub]
    assert main(argv) == 0

    (create, who, body), (validate, _, card), (preupload, _, _), (commit, _, payload) = FakeHub.requests
    assert create == "/api/repos/create"
    assert json.loads(body) == {
        "name": "football",
        "organization": "me",
        "type": "model",
        "visibility": "private",
    }
    assert who == "Bearer hf_test"
    # the library has the Hub check the model card's YAML header before it uploads anything
    assert validate == "/api/validate-yaml" and json.loads(card)["content"] == (run / "README.md").read_text()
    assert (
        preupload == "/api/models/me/football/preupload/main"
        and commit == "/api/models/me/football/commit/main"
    )
    lines = [json.loads(line) for line in payload.decode().splitlines()]
    assert lines[0]["key"] == "header" and "trained on" in lines[0]["value"]["summary"]
    sent = {
        v["path"]: base64.b64decode(v["content"])
        for k, v in ((x["key"], x["value"]) for x in lines)
        if k == "file"
    }
    expected = {
        p.relative_to(run).as_posix()
        for p in run.rglob("*")
        if p.is_file()
        and not p.relative_to(run).as_posix().startswith(("checkpoints/", "feature_cache", "trackers.json"))
    }
    assert set(sent) == expected and (run / "trackers.json").exists()  # it names this machine's stores
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "vlmtune.yaml",
        "metrics.jsonl",
    ):
        assert sent[name] == (run / name).read_bytes()  # byte for byte
    assert any(name.startswith("tensorboard/") for name in sent)  # the Hub's Metrics tab reads these


def test_push_refuses_what_is_not_a_finished_run_before_any_request(tmp_path, hub, capsys):
    (tmp_path / "half").mkdir()
    assert main(["push", str(tmp_path / "half"), "me/x", "--endpoint", hub]) == 2
    assert "is not a finished vlmtune run directory" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "half"), "no-slash", "--endpoint", hub]) == 2
    assert "REPO_ID must be user/name or org/name" in capsys.readouterr().err
    assert FakeHub.requests == []
