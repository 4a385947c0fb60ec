"""What does the router's HTTP front cost a client, against calling the same worker directly?

One run on loopback: a vLLM-shaped fake worker (its own process) that answers each chat completion after a
fixed time (50 ms, like a short decode, and 0 ms, the router's own ceiling), the router (``kvtier router``,
its own process) in front of it, and a client (this process, aiohttp) holding ``--concurrency`` requests in
flight, streaming or not. The baseline is the same client calling the worker directly. Reported: requests/s,
p50 and p99 latency, router/direct throughput ratio, the p50 the router adds, and CPU time per request of
the worker (direct) and of the router process (which does not depend on what else runs on the machine);
each the median of ``--repeat`` runs with direct and router alternating.

``kvtier bench front [--quick] [--json PATH] [--plot PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvtier.bench.common import machine_line, print_table, pyplot, write_json
from kvtier.command_options import non_negative_int, output_path, positive_int
from kvtier.testing.vllm_server import free_port, wait_healthy

PROMPT = [{"role": "system", "content": "You are a coding agent. " * 40}, {"role": "user", "content": "next step?"}]
ANSWER = ["I ", "will ", "read ", "the ", "file ", "first."]


# --- the fake worker (run as: python -m kvtier.bench.front PORT DELAY_S) ---------------------------------
def serve_worker(port: int, delay_s: float) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if delay_s:
            await asyncio.sleep(delay_s)
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body.get("model", "m")}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(ANSWER)}
            return web.json_response({**base, "object": "chat.completion", "usage": {"prompt_tokens": 300, "completion_tokens": 6},
                                      "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, piece in enumerate(ANSWER):
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": piece},
                                          "finish_reason": "stop" if i == len(ANSWER) - 1 else None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- processes --------------------------------------------------------------------------------------------
def start(cmd: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd)
    wait_healthy(proc, url)
    return proc


def start_worker(delay_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start([sys.executable, "-m", "kvtier.bench.front", str(port), str(delay_s)], url), url


def start_router(worker: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kvtier.cli", "router", "--port", str(port), "--worker", worker,
           "--max-inflight", "4096", "--max-waiting", "4096", "--log-level", "WARNING"]
    return start(cmd, url), url


# --- the client -------------------------------------------------------------------------------------------
def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU time of a process so far (Linux /proc): the router's own cost, whatever else runs."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, concurrency: int, requests: int, warmup: int, stream: bool, bar: tqdm) -> dict:
    """``warmup`` then ``requests`` chat completions with ``concurrency`` in flight, over kept-alive
    connections as agents' clients hold them; throughput and latency percentiles of the second part."""
    import aiohttp

    body = json.dumps({"model": "m", "messages": PROMPT, "max_tokens": 16, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    failures = 0
    remaining = 0

    async def one_client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
                data = await resp.read()
                ok = resp.status == 200 and (b"[DONE]" in data if stream else b'"choices"' in data)
            latencies.append(time.perf_counter() - started)
            failures += not ok
            bar.update()

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        remaining = warmup
        await asyncio.gather(*(one_client(session) for _ in range(concurrency)))
        latencies.clear()
        remaining, failures = requests, 0
        began = time.perf_counter()
        await asyncio.gather(*(one_client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    lat = np.asarray(latencies) * 1e3
    return {"rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "failures": failures}


def measure(name: str, url: str, proc: subprocess.Popen, concurrency: int, stream: bool, args: argparse.Namespace,
            bar: tqdm) -> dict:
    """One target once: the client's figures and the CPU per request of the process in front (worker or router)."""
    cpu = cpu_seconds(proc)
    result = asyncio.run(load(url, concurrency, args.requests, args.warmup, stream, bar))
    result["cpu_us"] = (cpu_seconds(proc) - cpu) / (args.requests + args.warmup) * 1e6
    return {f"{name}_{k}": v for k, v in result.items()}


def median_row(samples: list[dict]) -> dict:
    """Per-figure medians over repeats (a shared machine's load drifts; direct and router alternate)."""
    row = {k: float(np.median([s[k] for s in samples])) for k in samples[0]}
    row["rps_ratio"] = float(np.median([s["router_rps"] / s["direct_rps"] for s in samples]))
    row["added_p50_ms"] = float(np.median([s["router_p50_ms"] - s["direct_p50_ms"] for s in samples]))
    return row


def sweep(args: argparse.Namespace) -> dict:
    delays = [0.05, 0.0]
    cases = [(c, s) for c in (64, 256) for s in (False, True)]
    rows = []
    total = len(delays) * len(cases) * args.repeat * 2 * (args.requests + args.warmup)
    with tqdm(total=total, desc="requests", unit="req") as bar:
        for delay in delays:
            worker, worker_url = start_worker(delay)
            router, router_url = start_router(worker_url)
            try:
                for concurrency, stream in cases:
                    samples = [{**measure("direct", worker_url, worker, concurrency, stream, args, bar),
                                **measure("router", router_url, router, concurrency, stream, args, bar)}
                               for _ in range(args.repeat)]
                    rows.append({"worker_ms": delay * 1e3, "concurrency": concurrency, "stream": stream,
                                 **median_row(samples)})
            finally:
                for proc in (router, worker):
                    proc.terminate()
                    proc.wait(timeout=10)
    return {"machine": machine_line(), "python": platform.python_version(), "requests_per_case": args.requests, "repeats": args.repeat,
            "rows": rows}


def plot(result: dict, path: str) -> None:
    plt = pyplot()

    rows = result["rows"]
    labels = [f"{r['worker_ms']:.0f}ms c{r['concurrency']}{' s' if r['stream'] else ''}" for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    ax1.bar(x - 0.2, [r["direct_rps"] for r in rows], 0.4, label="direct")
    ax1.bar(x + 0.2, [r["router_rps"] for r in rows], 0.4, label="through the router")
    ax1.set_ylabel("requests/s")
    ax2.bar(x - 0.2, [r["direct_p50_ms"] for r in rows], 0.4, label="direct p50")
    ax2.bar(x + 0.2, [r["router_p50_ms"] for r in rows], 0.4, label="router p50")
    ax2.set_ylabel("ms")
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.legend()
    fig.suptitle(f"router front vs direct (worker ms, concurrency, s = streaming) — {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=positive_int, default=3000, help="requests per case and target")
    parser.add_argument("--warmup", type=non_negative_int, default=300, help="requests per case and target before the clock")
    parser.add_argument("--repeat", type=positive_int, default=3, help="runs per case; medians are reported")
    parser.add_argument("--quick", action="store_true", help="500 requests per case, one run")
    parser.add_argument("--json", type=output_path, help="write the rows here")
    parser.add_argument("--plot", type=output_path, help="write a PNG of requests/s and p50 per case here")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.requests, args.warmup, args.repeat = 500, 100, 1
    result = sweep(args)
    columns = ["worker_ms", "concurrency", "stream", "direct_rps", "router_rps", "rps_ratio", "direct_p50_ms",
               "router_p50_ms", "added_p50_ms", "direct_p99_ms", "router_p99_ms", "direct_cpu_us", "router_cpu_us",
               "direct_failures", "router_failures"]
    print_table(result["rows"], columns, f"router front vs direct ({result['machine']})")
    write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":  # the fake worker's process: python -m kvtier.bench.front PORT DELAY_S
    serve_worker(int(sys.argv[1]), float(sys.argv[2]))
