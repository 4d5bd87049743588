"""`vlmtune serve` under load, on loopback only: N concurrent clients for T seconds against one-at-a-time
requests, and against N clients with dynamic batching switched off (--max-batch 1).

    python bench/serve_load.py                         # tiny model, 16 clients, 10 s a row (make bench-serve)
    python bench/serve_load.py --model DIR --run football=RUN --clients 64 --seconds 30   # a real model

Each row starts its own `vlmtune serve` process on a free port of 127.0.0.1, waits for /health, then its
clients post OpenAI chat completions (one drawn football scene as a data URI, greedy, --max-tokens) until the
time is up or --max-requests have gone out. Every non-200 answer or failed connection counts as an error.
Latency is per request, from send to full reply; `batch` is the server's mean rows per generate call.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from vlmtune.serve.process import ServerProcess  # noqa: E402


@dataclass
class Row:
    name: str
    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    batch: float = 0.0

    def line(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan")
        rps = len(lat) / self.seconds if self.seconds else 0.0
        return (
            f"| {self.name:<26} | {self.clients:>7} | {len(lat):>8} | {self.errors:>6} | {rps:>9.1f} "
            f"| {p50:>8.1f} | {p99:>8.1f} | {self.batch:>5.1f} |"
        )


async def load(url: str, body: dict, clients: int, seconds: float, max_requests: int, row: Row) -> None:
    sent = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < deadline and sent < max_requests:
            sent += 1
            start = time.perf_counter()
            try:
                r = await http.post(url + "/v1/chat/completions", json=body)
                ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
            except httpx.HTTPError:
                ok = False
            if ok:
                row.latencies.append(time.perf_counter() - start)
            else:
                row.errors += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        row.seconds = time.perf_counter() - start


def measure(name: str, serve_args: list[str], body: dict, clients: int, args: argparse.Namespace) -> Row:
    server = ServerProcess(*serve_args)
    try:
        asyncio.run(load(server.url, body, 1, 1.0, 4, Row("warm-up", 1)))  # first-call costs out of the way
        before = server.health()
        row = Row(name, clients)
        asyncio.run(load(server.url, body, clients, args.seconds, args.max_requests, row))
        after = server.health()
        batches = after["batches"] - before["batches"]
        row.batch = (after["rows"] - before["rows"]) / batches if batches else 0.0
        print(row.line(), flush=True)
        return row
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument(
        "--run", action="append", default=[], help="NAME=RUN_DIR to serve (requests go to the first)"
    )
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each row")
    p.add_argument("--max-requests", type=int, default=20_000, help="cap per row")
    p.add_argument("--max-tokens", type=int, default=20)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from vlmtune.data.synthetic import football_example

    buf = io.BytesIO()
    football_example(random.Random(0)).image.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}],
        "max_tokens": args.max_tokens,
    }
    serve = ["--model", args.model] + [a for r in args.run for a in ("--run", r)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
    )
    print(
        f"model: {args.model} {' '.join(args.run)}; {args.max_tokens} new tokens a request; {args.seconds:g} s a row\n"
    )
    print(
        "| mode                       | clients | requests | errors | request/s | p50 (ms) | p99 (ms) | batch |"
    )
    print(
        "|----------------------------|--------:|---------:|-------:|----------:|---------:|---------:|------:|"
    )
    one = measure("one at a time", serve, body, 1, args)
    many = measure("concurrent, batching", serve, body, args.clients, args)
    unbatched = measure("concurrent, --max-batch 1", [*serve, "--max-batch", "1"], body, args.clients, args)
    rps = {r.name: len(r.latencies) / r.seconds for r in (one, many, unbatched)}
    print(f"\nconcurrent/one-at-a-time: {rps[many.name] / rps[one.name]:.1f}x requests/s")
    print(
        f"batching on/off at {args.clients} clients: {rps[many.name] / rps[unbatched.name]:.1f}x requests/s"
    )
    errors = one.errors + many.errors + unbatched.errors
    print(f"errors: {errors}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
