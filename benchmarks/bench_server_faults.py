#!/usr/bin/env python3
"""Faults and impatient clients against `rkedge serve --mock` over loopback (a script that prints figures).

Phase 1: 32 clients x 2 requests at RK3588 board pace (Qwen2.5-1.5B: 338 prefill, 16.7 decode tokens/s); a
quarter of them are impatient: they leave while queued, leave mid-stream, or leave a non-streaming request.
Phase 2: the same mix against an NPU that fails every run after a few tokens (RKEDGE_MOCK_FAULT).
Phase 3: 2,000 requests at unlimited pace, a quarter of them left mid-stream; the server's RSS before/after.

Printed: requests by outcome, orphan runs (runs that went on to their end after their client left, counted
from the simulated NPU's call log), patient completion, how many tokens the NPU generated after a streaming
client left, RSS, queue wait p50/p95. Target: 100% patient completion in phases 1 and 3 (in phase 2 every
patient request ends in an error event: no hang, no truncated answer passed off as complete), 0 orphans,
RSS flat.

Usage: python benchmarks/bench_server_faults.py [--clients 32] [--requests 2] [--soak 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench_server import REPLY, pct, running_server  # the script's folder is on sys.path

BOARD_PACE = "338.4,16.69"
BEHAVIOURS = ("leave-queued", "leave-mid-stream", "leave-non-streaming")
LEAVE_AFTER_S = 0.3  # a non-streaming leaver goes this long after its run began (about 5 tokens at board pace)


def body(tag: str, stream: bool) -> dict[str, Any]:
    # The tag makes each run traceable in the call log (the prompt is logged; replies do not depend on it).
    return {"model": "bench", "stream": stream, "messages": [{"role": "user", "content": f"describe the board {tag}"}]}


async def patient_request(client: httpx.AsyncClient, tag: str, out: list[dict[str, Any]]) -> None:
    record: dict[str, Any] = {"tag": tag, "kind": "patient"}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body(tag, True)) as response:
            record["status"] = response.status_code
            record["queue_wait_ms"] = float(response.headers.get("X-Rkedge-Queue-Wait-Ms", "nan"))
            text, error = "", None
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                for choice in event.get("choices", []):
                    text += choice.get("delta", {}).get("content") or ""
            record["outcome"] = "complete" if text == REPLY and error is None else \
                "error event" if error else f"HTTP {response.status_code}" if response.status_code != 200 else "partial"
    except httpx.HTTPError as exc:
        record["outcome"] = type(exc).__name__
    out.append(record)


async def impatient_request(url: str, tag: str, behaviour: str, out: list[dict[str, Any]], log: Path | None
                            ) -> None:
    """Leaves while queued (no answer within 0.3 s), mid-stream (after 3 pieces), or a non-streaming request
    0.3 s after its run began on the NPU (seen in the call log), or while queued when there is no log."""
    record: dict[str, Any] = {"tag": tag, "kind": behaviour, "outcome": "left", "received": 0}
    timeout = {"leave-queued": 0.3, "leave-mid-stream": 600.0, "leave-non-streaming": 600.0}[behaviour]
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        try:
            if behaviour == "leave-non-streaming":
                request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body(tag, False)))
                while log is not None and not request.done() and not run_started(log, tag):
                    await asyncio.sleep(0.02)
                await asyncio.wait([request], timeout=LEAVE_AFTER_S)
                if request.done():
                    record["outcome"] = "answered before leaving"
                request.cancel()  # closes the connection: the client is gone
            else:
                async with client.stream("POST", "/v1/chat/completions", json=body(tag, True)) as response:
                    async for line in response.aiter_lines():
                        choices = json.loads(line[6:]).get("choices", []) if line.startswith("data: {") else []
                        if any(c.get("delta", {}).get("content") for c in choices):
                            record["received"] += 1
                            if behaviour == "leave-mid-stream" and record["received"] >= 3:
                                break
                    else:
                        record["outcome"] = "answered before leaving"
        except httpx.HTTPError:
            pass  # timed out: left
    out.append(record)


def run_started(log: Path, tag: str) -> bool:
    marker = f"describe the board {tag}".encode().hex()
    return log.exists() and marker in log.read_text(encoding="utf-8")


def read_runs(log: Path) -> list[dict[str, Any]]:
    """Runs in order, each its rkllm_run line (prompt) and its run_end line (the NPU serves one at a time)."""
    runs: list[dict[str, Any]] = []
    for line in log.read_text(encoding="utf-8").splitlines() if log.exists() else []:
        row = json.loads(line)
        if row["fn"] in ("rkllm_run", "rkllm_run_async"):
            prompt = bytes.fromhex(row.get("prompt_hex", "")).decode("utf-8", "replace")
            runs.append({"tag": prompt.split("describe the board ")[-1].split("<")[0].strip()})
        elif row["fn"] == "run_end" and runs:
            runs[-1].update(generated=row["generated_tokens"], aborted=row["aborted"])
    return runs


async def mixed_load(url: str, clients: int, requests: int, log: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    async def one_client(index: int) -> None:
        impatient = index % 4 == 3
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for turn in range(requests):
                tag = f"c{index}r{turn}"
                if impatient:
                    behaviour = BEHAVIOURS[(index // 4 + turn) % len(BEHAVIOURS)]
                    await impatient_request(url, tag + "-" + behaviour, behaviour, results, log)
                else:
                    await patient_request(client, tag, results)

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return results


def report(title: str, results: list[dict[str, Any]], runs: list[dict[str, Any]], elapsed: float) -> None:
    patient = [r for r in results if r["kind"] == "patient"]
    by_tag = {r["tag"]: r for r in results}
    ran = {run["tag"]: run for run in runs}
    left = [r for r in results if r["kind"] != "patient" and r["outcome"] == "left"]
    orphans = [r for r in left if r["tag"] in ran and not ran[r["tag"]].get("aborted")]
    print(f"{title}: {len(results)} requests in {elapsed:.1f} s, {len(runs)} runs on the NPU")
    print("  outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(Counter(
        f"{r['kind']} -> {r['outcome']}" for r in results).items())))
    for kind in BEHAVIOURS:
        mine = [r for r in left if r["kind"] == kind]
        queued = sum(r["tag"] not in ran for r in mine)
        print(f"  {kind}: {len(mine)} left, {queued} while queued (never reached the NPU), "
              f"{len(mine) - queued} mid-run")
    done = sum(r["outcome"] == "complete" for r in patient)
    print(f"  patient completion: {done}/{len(patient)} ({100 * done / max(1, len(patient)):.0f}%)")
    print(f"  orphan runs (went on after their client left): {len(orphans)}")
    overrun = [ran[r["tag"]]["generated"] - r["received"] for r in left
               if r["kind"] == "leave-mid-stream" and r["tag"] in ran]
    if overrun:
        print(f"  tokens the NPU generated after a streaming client's last piece: max {max(overrun)}, "
              f"p50 {pct(overrun, .5)}")
    non_stream = [ran[r["tag"]]["generated"] for r in left if r["kind"] == "leave-non-streaming" and r["tag"] in ran]
    if non_stream:
        print(f"  non-streaming leavers ({LEAVE_AFTER_S} s into the run): aborted at tokens {sorted(non_stream)} "
              f"(of a full reply's "
              f"{max((run.get('generated', 0) for run in runs if by_tag.get(run['tag'], {}).get('outcome') == 'complete'), default='?')})")
    waits = [r["queue_wait_ms"] for r in patient if r.get("queue_wait_ms") == r.get("queue_wait_ms")]
    print(f"  queue wait p50 {pct(waits, .5):.0f} ms, p95 {pct(waits, .95):.0f} ms")


async def soak(url: str, pid: int, total: int) -> None:
    process = psutil.Process(pid)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        warm: list[dict[str, Any]] = []
        for index in range(50):
            await patient_request(client, f"warm{index}", warm)
        results: list[dict[str, Any]] = []
        before = process.memory_info().rss
        started = time.perf_counter()
        for index in range(total):
            if index % 4 == 3:
                await impatient_request(url, f"s{index}", "leave-mid-stream", results, None)
            else:
                await patient_request(client, f"s{index}", results)
        elapsed = time.perf_counter() - started
    after = process.memory_info().rss
    done = sum(r.get("outcome") == "complete" for r in results if r["kind"] == "patient")
    print(f"phase 3: {total} requests at unlimited pace in {elapsed:.1f} s, a quarter left mid-stream; "
          f"patient complete {done}/{sum(r['kind'] == 'patient' for r in results)}")
    print(f"  server RSS {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB ({(after - before) / 2**20:+.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--soak", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "bench.rkllm"
        subprocess.run([sys.executable, "-m", "rkedge", "mock-model", "--out", str(model), "--name", "bench",
                        "--template", "gemma", "--toolkit-version", "1.2.1", "--response", REPLY], check=True,
                       stdout=subprocess.DEVNULL)
        queue = str(args.clients + 8)  # everyone may queue: patient clients are never turned away
        for title, fault in (("phase 1 (board pace)", None), ("phase 2 (NPU fails every run)",
                                                              json.dumps({"error_after_tokens": 4}))):
            log = Path(folder) / f"calls-{len(title)}.jsonl"
            env = {"RKEDGE_MOCK_CALL_LOG": str(log), **({"RKEDGE_MOCK_FAULT": fault} if fault else {})}
            with running_server(model, BOARD_PACE, int(queue), env=env) as (proc, url):
                rss = psutil.Process(proc.pid).memory_info().rss
                started = time.perf_counter()
                results = asyncio.run(mixed_load(url, args.clients, args.requests, log))
                elapsed = time.perf_counter() - started
                time.sleep(1)  # the last aborted run's end reaches the log
                report(title, results, read_runs(log), elapsed)
                print(f"  server RSS {rss / 2**20:.1f} -> {psutil.Process(proc.pid).memory_info().rss / 2**20:.1f} MB, "
                      f"alive: {proc.poll() is None}")
        with running_server(model, "unlimited", 8, env={"RKEDGE_MOCK_CALL_LOG": os.devnull}) as (proc, url):
            asyncio.run(soak(url, proc.pid, args.soak))


if __name__ == "__main__":
    main()
