"""`vlmtune serve`: a base model and its adapters behind an OpenAI-style HTTP API and a web page.

engine.py   the model side: base + adapters in memory, dynamic batching on a worker thread
uploads.py  untrusted images: data URIs only, decoded and size-checked before use
app.py      the routes, errors as JSON, the body limit and the API key
static/     the page at /, served from the package (no CDN)
"""

from __future__ import annotations

import os

from ..config import ServeConfig, validate_serve

KEY_VARIABLE = "VLMTUNE_API_KEY"


def build(cfg: ServeConfig):  # -> FastAPI
    """The app for `cfg`, with its model loaded (what `serve` runs, and what tests drive directly)."""
    try:
        from .app import create_app
    except ImportError as e:
        raise ImportError(f"vlmtune serve needs its extra: pip install 'vlmtune[serve]' ({e})") from e
    from .engine import Engine, parse_runs

    validate_serve(cfg)
    engine = Engine.load(parse_runs(cfg.run), cfg.model, cfg.dtype, cfg.engine)
    return create_app(engine, cfg, cfg.api_key or os.environ.get(KEY_VARIABLE) or None)


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    app = build(cfg)
    key = "on" if cfg.api_key or os.environ.get(KEY_VARIABLE) else "off"
    names = ", ".join(app.state.batcher.engine.adapters)
    print(f"vlmtune serve: models {names}; API key {key}; http://{cfg.host}:{cfg.port}/ (docs at /docs)")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and key == "off":
        print("vlmtune serve: warning: listening beyond this machine with no --api-key", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=5, log_level="info")
