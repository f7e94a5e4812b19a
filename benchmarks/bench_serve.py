"""The HTTP service under a bounded load on loopback, against the library on the same index.

For each index (the demo index from ``make demo``, and a caption index made here with a real-size
BERT-base text tower), in one run:

- the library's batched ``search_texts`` throughput (queries/s, batches of 64) and a warm
  ``search_text`` call's median latency;
- ``retrieval serve`` started on a free loopback port, with coalescing on (``--max-batch 64``) and
  off (``--max-batch 1``); at concurrency 1, 4, 16 and 64, clients send text searches for a bounded
  time and number of requests: QPS, p50 and p99 latency, failed requests;
- printed: HTTP QPS at concurrency 16 with coalescing ÷ the library's batched QPS (target ≥ 0.7),
  and the p50 at concurrency 1 minus the library's warm call (the latency HTTP adds).

The load generator runs in this process (asyncio + httpx) on the same cores as the service, as a
client beside the service would; every query is a distinct sentence.

    python benchmarks/bench_serve.py                      # demo index and BERT-base, ~10 minutes
    python benchmarks/bench_serve.py --skip-bert --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import WORDS, make_model_dir

from retrieval import BuildConfig, Retriever, build_index

ROOT = Path(__file__).resolve().parents[1]


def sentences(n: int, rng: np.random.Generator) -> list[str]:
    lengths = rng.integers(4, 12, n)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in lengths]


def library(index: Path, target: str, queries: list[str], k: int) -> dict[str, float]:
    with Retriever.open(index, device="cpu") as r:
        r.search_texts(queries[:64], k=k, target=target)  # load and warm
        started = time.perf_counter()
        done = 0
        while done < len(queries) and time.perf_counter() - started < 20:
            r.search_texts(queries[done : done + 64], k=k, target=target)
            done += 64
        batched = min(done, len(queries)) / (time.perf_counter() - started)
        latencies = []
        for text in queries[:200]:
            t = time.perf_counter()
            r.search_text(text, k=k, target=target)
            latencies.append(time.perf_counter() - t)
    return {"batched_qps": batched, "single_ms": float(np.median(latencies)) * 1000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, index: Path, max_batch: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "retrieval"), "serve", "--index", str(index)]
        command += ["--port", str(self.port), "--device", "cpu", "--max-batch", str(max_batch)]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"retrieval serve exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("retrieval serve was not ready in 300 s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def load(url: str, target: str, queries: list[str], concurrency: int, seconds: float, cap: int) -> dict:
    """``concurrency`` clients, each sending one search after another, for ``seconds`` or ``cap``
    requests in all, whichever ends first."""
    latencies: list[float] = []
    failed = 0
    sent = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        # Warm each connection (and the service) before the clock starts.
        await asyncio.gather(
            *(
                client.post("/v1/search", json={"text": q, "k": 10, "target": target})
                for q in queries[:concurrency]
            )
        )

        async def worker() -> None:
            nonlocal failed, sent
            while time.monotonic() < deadline and sent < cap:
                text = queries[sent % len(queries)]
                sent += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/search", json={"text": text, "k": 10, "target": target})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                failed += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "qps": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "requests": len(latencies),
        "failed": failed,
    }


def bert_index(work: Path, rng: np.random.Generator, captions: int) -> Path:
    print(f"building a {captions:,}-caption index with a random-init BERT-base text tower...", flush=True)
    spec = make_model_dir(work / "bert", rng)
    corpus = work / "captions.txt"
    corpus.write_text("\n".join(sentences(captions, rng)) + "\n")
    out = work / "bert-index"
    build_index(BuildConfig(out=out, captions=(corpus,), model=spec, device="cpu"))
    return out


def measure(
    name: str, index: Path, levels: list[int], seconds: float, cap: int, rng: np.random.Generator
) -> dict:
    with Retriever.open(index, device="cpu") as r:
        target = "images" if r.store.state("images").index is not None else "captions"
    queries = sentences(4000, rng)
    lib = library(index, target, queries, 10)
    print(
        f"\n{name}: library search_texts {lib['batched_qps']:,.1f} queries/s batched, "
        f"warm search_text {lib['single_ms']:.2f} ms (target {target})",
        flush=True,
    )
    rows = {}
    for mode, max_batch in (("on", 64), ("off", 1)):
        server = Server(index, max_batch)
        try:
            for concurrency in levels:
                fresh = sentences(cap, rng)
                row = asyncio.run(load(server.url, target, fresh, concurrency, seconds, cap))
                rows[(mode, concurrency)] = row
                print(
                    f"  coalescing {mode:>3}  c={concurrency:<3} {row['qps']:8.1f} q/s  "
                    f"p50 {row['p50']:8.1f} ms  p99 {row['p99']:8.1f} ms  "
                    f"({row['requests']} requests, {row['failed']} failed)",
                    flush=True,
                )
        finally:
            server.stop()
    at16 = rows.get(("on", 16))
    ratio = at16["qps"] / lib["batched_qps"] if at16 else float("nan")
    added = rows[("on", levels[0])]["p50"] - lib["single_ms"]
    print(f"  HTTP c=16 (coalescing on) / library batched: {ratio:.2f} (target >= 0.7)")
    print(f"  added latency at c={levels[0]}: {added:+.2f} ms over a warm library call")
    return {
        "library": lib,
        "load": {f"{m}-{c}": v for (m, c), v in rows.items()},
        "ratio_c16": ratio,
        "added_ms": added,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo", type=Path, default=ROOT / "indexes" / "demo", help="the demo index (make demo)"
    )
    parser.add_argument("--skip-bert", action="store_true", help="only the demo index")
    parser.add_argument("--bert-captions", type=int, default=2000, help="captions in the BERT-base index")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per level (at most)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level (at most)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    rng = np.random.default_rng(0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; loopback only", flush=True)
    figures = {}
    if (args.demo / "catalog.json").exists():
        figures["demo"] = measure("demo index", args.demo, levels, args.seconds, args.requests, rng)
    else:
        print(f"{args.demo} has no index: run `make demo` first to include it")
    if not args.skip_bert:
        with tempfile.TemporaryDirectory() as work:
            index = bert_index(Path(work), rng, args.bert_captions)
            figures["bert-base"] = measure(
                "BERT-base caption index", index, levels, args.seconds, args.requests, rng
            )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
