#!/usr/bin/env python3
"""Load on `rkedge serve --mock` over loopback: queueing at board pace, then a memory soak.

Phase 1: 32 concurrent streaming clients x 10 requests each, at RK3588 board pace (Qwen2.5-1.5B figures:
338 prefill tokens/s, 16.69 decode tokens/s). Every request must complete or get 429 (none lost); prints
throughput, queue wait and TTFT percentiles. Clients do not retry after a 429 (they go on to their next
request after a short pause), so the phase is bounded in time.
Phase 2: 2,000 requests at unlimited pace; prints the server's RSS every 250 requests (memory must stay flat).

Usage: python benchmarks/bench_server.py [--clients 32] [--requests 10] [--soak 2000] [--max-queue 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

REPLY = "The RK3588 NPU has three cores and runs int8 models from the board's memory."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, pace: str, max_queue: int, *extra: str,
                   env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    proc, url, log = start_server(model, pace, max_queue, *extra, env=env)
    try:
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(20)
        log.unlink(missing_ok=True)


def start_server(model: Path, pace: str, max_queue: int, *extra: str,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    # stderr (the access log: a line per request) goes to a file: an unread pipe would fill and stall the server
    log = tempfile.NamedTemporaryFile(prefix="rkedge-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "rkedge", "serve", str(model), "--mock", "--port", str(port),
                             "--max-queue", str(max_queue), *extra],
                            env={**os.environ, "RKEDGE_MOCK_PACE": pace, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, Path(log.name)
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start: " + Path(log.name).read_text(errors="replace")[-2000:])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(client: httpx.AsyncClient, results: list[dict]) -> None:
    started = time.perf_counter()
    body = {"model": "bench", "messages": [{"role": "user", "content": "describe the board"}], "stream": True}
    record: dict = {"status": None}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            record["status"] = response.status_code
            record["queue_wait_ms"] = float(response.headers.get("X-Rkedge-Queue-Wait-Ms", "nan"))
            if response.status_code == 200:
                text, first = "", None
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"]
                    piece = delta[0]["delta"].get("content") if delta else None
                    if piece:
                        first = first or time.perf_counter()
                        text += piece
                record["ttft_ms"] = ((first or time.perf_counter()) - started) * 1000
                record["complete"] = text == REPLY
            else:
                await response.aread()
    except httpx.HTTPError as exc:
        record["error"] = repr(exc)
    record["seconds"] = time.perf_counter() - started
    results.append(record)


async def phase_queue(url: str, clients: int, requests: int) -> None:
    results: list[dict] = []

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for _ in range(requests):
                await one_request(client, results)
                if results[-1]["status"] == 429:
                    await asyncio.sleep(0.2)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] == 429]
    other = [r for r in results if r["status"] not in (200, 429)]
    print(f"phase 1: {clients} clients x {requests} requests at board pace, {elapsed:.1f} s")
    print(f"  answered: {len(results)}/{clients * requests} (none lost: {len(results) == clients * requests})")
    print(f"  200: {len(ok)} (complete replies: {sum(r.get('complete', False) for r in ok)}), 429: {len(rejected)}, "
          f"other: {len(other)} {[r.get('status') or r.get('error') for r in other][:5]}")
    print(f"  throughput: {len(ok) / elapsed:.2f} completed requests/s")
    ttft = [r["ttft_ms"] for r in ok]
    waits = [r["queue_wait_ms"] for r in ok]
    print(f"  TTFT ms     p50 {pct(ttft, .5):8.0f}  p90 {pct(ttft, .9):8.0f}  p99 {pct(ttft, .99):8.0f}")
    print(f"  queue wait  p50 {pct(waits, .5):8.0f}  p90 {pct(waits, .9):8.0f}  p99 {pct(waits, .99):8.0f} ms")


async def phase_soak(url: str, pid: int, total: int) -> None:
    process = psutil.Process(pid)
    samples = [(0, process.memory_info().rss)]
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = time.perf_counter()
        for index in range(1, total + 1):
            await one_request(client, results)
            if index % 250 == 0:
                samples.append((index, process.memory_info().rss))
        elapsed = time.perf_counter() - started
    ok = sum(r["status"] == 200 for r in results)
    print(f"phase 2: {total} requests at unlimited pace in {elapsed:.1f} s ({total / elapsed:.0f} requests/s), {ok} ok")
    print("  server RSS: " + ", ".join(f"{n}: {rss / 2**20:.1f} MB" for n, rss in samples))
    growth = (samples[-1][1] - samples[1][1]) / 2**20 if len(samples) > 2 else float("nan")
    print(f"  growth after warm-up (request 250 -> {samples[-1][0]}): {growth:+.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--soak", type=int, default=2000)
    parser.add_argument("--max-queue", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "bench.rkllm"
        subprocess.run([sys.executable, "-m", "rkedge", "mock-model", "--out", str(model), "--name", "bench",
                        "--template", "gemma", "--toolkit-version", "1.2.1", "--response", REPLY], check=True,
                       stdout=subprocess.DEVNULL)
        with running_server(model, "338.4,16.69", args.max_queue) as (proc, url):
            asyncio.run(phase_queue(url, args.clients, args.requests))
            print(f"  server alive after phase 1: {proc.poll() is None}")
        with running_server(model, "unlimited", args.max_queue) as (proc, url):
            asyncio.run(phase_soak(url, proc.pid, args.soak))
            print(f"  server alive after phase 2: {proc.poll() is None}")


if __name__ == "__main__":
    main()
