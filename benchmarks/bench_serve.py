"""The HTTP service under a bounded load on loopback, against the library on the same index.

For each index (the demo index from ``make demo``, and a caption index made here with a real-size
BERT-base text tower), in one run:

- the library's batched ``search_texts`` throughput (queries/s, batches of 64) and a warm
  ``search_text`` call's median latency;
- ``retrieval serve`` started on a free loopback port with its defaults, coalescing on
  (``--max-batch 64``) and off (``--max-batch 1``); at concurrency 1, 4, 16 and 64, clients send
  text searches for a bounded time and number of requests: QPS, p50 and p99 latency, failed
  requests, the mean coalesced batch;
- printed: HTTP QPS at concurrency 16 with coalescing ÷ the library's batched QPS (target ≥ 0.7),
  and the p50 at concurrency 1 minus the library's warm call (the latency HTTP adds).

The load generator runs in this process on the same cores as the service, as a client beside
the service would: one keep-alive HTTP/1.1 connection per client on asyncio streams (cheap per
request, so the service keeps the cores); every query is a distinct sentence.

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
import threading
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
    """Batched throughput at batches of 64 and of 16 (what concurrency 16 can coalesce at most),
    and a warm single call's median latency."""
    out = {}
    with Retriever.open(index, device="cpu") as r:
        r.search_texts(queries[:64], k=k, target=target)  # load and warm
        # The single call first, before batches of 64 leave the allocator holding larger blocks.
        for text in queries[:20]:
            r.search_text(text, k=k, target=target)
        latencies = []
        for text in queries[:200]:
            t = time.perf_counter()
            r.search_text(text, k=k, target=target)
            latencies.append(time.perf_counter() - t)
        for batch in (64, 16):
            started = time.perf_counter()
            done = 0
            while done < len(queries) and time.perf_counter() - started < 15:
                r.search_texts(queries[done : done + batch], k=k, target=target)
                done += batch
            out[f"batched_qps_{batch}"] = min(done, len(queries)) / (time.perf_counter() - started)
    return out | {"batched_qps": out["batched_qps_64"], "single_ms": float(np.median(latencies)) * 1000}


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


class _Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for JSON POSTs.

    A load generator on the same two cores as the service must cost little per request: httpx's
    pool spent about a core at 64 connections, which the service then lacked.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> _Connection:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(
    url: str,
    target: str,
    queries: list[str],
    concurrency: int,
    seconds: float,
    cap: int,
    stop: threading.Event | None = None,
) -> dict:
    """``concurrency`` clients, each sending one search after another on its own connection, for
    ``seconds`` or ``cap`` requests in all (or until ``stop`` is set), whichever ends first."""
    stop = stop or threading.Event()
    latencies: list[float] = []
    failed = 0
    sent = 0
    connections = [await _Connection.open(url) for _ in range(concurrency)]
    # Warm each connection (and the service) before the clock starts.
    await asyncio.gather(
        *(
            c.post("/v1/search", {"text": q, "k": 10, "target": target})
            for c, q in zip(connections, queries, strict=False)
        )
    )
    deadline = time.monotonic() + seconds

    async def worker(connection: _Connection) -> None:
        nonlocal failed, sent
        while time.monotonic() < deadline and sent < cap and not stop.is_set():
            text = queries[sent % len(queries)]
            sent += 1
            started = time.perf_counter()
            try:
                status, _ = await connection.post("/v1/search", {"text": text, "k": 10, "target": target})
                ok = status == 200
            except (OSError, asyncio.IncompleteReadError, ValueError):
                ok = False
            latencies.append(time.perf_counter() - started)
            failed += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - started
    for connection in connections:
        connection.close()
    ms = np.array(latencies) * 1000
    return {
        "qps": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "requests": len(latencies),
        "failed": failed,
    }


def batch_sizes(url: str) -> tuple[float, float]:
    """The service's coalesced batches so far: (queries, batches), from its /metrics."""
    found = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for part in found:
            if line.startswith(f"retrieval_batch_size_{part} "):
                found[part] = float(line.split()[1])
    return found["sum"], found["count"]


def bert_index(work: Path, rng: np.random.Generator, captions: int) -> BuildConfig:
    print(f"building a {captions:,}-caption index with a random-init BERT-base text tower...", flush=True)
    (work / "bert").mkdir()
    spec = make_model_dir(work / "bert", rng)
    corpus = work / "captions.txt"
    corpus.write_text("\n".join(sentences(captions, rng)) + "\n")
    config = BuildConfig(out=work / "bert-index", captions=(corpus,), model=spec, device="cpu")
    build_index(config)
    return config


def memory(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {
        line.split(":")[0]: int(line.split()[1]) * 1024 / 1e9 for line in status if line.startswith("Vm")
    }
    return {"rss_gb": fields["VmRSS"], "peak_gb": fields["VmHWM"]}


def swap_cost(config: BuildConfig, rng: np.random.Generator, added: int) -> dict:
    """A swap under load: the service searched at concurrency 16 while ``added`` captions are
    appended and ``index build`` commits; until the service has swapped to the new version."""
    server = Server(config.out, 64)
    try:
        before = memory(server.process.pid)
        with config.captions[0].open("a") as corpus:
            corpus.write("\n".join(sentences(added, rng)) + "\n")
        stop, during = threading.Event(), {}
        queries = sentences(4000, rng)
        clients = threading.Thread(
            target=lambda: during.update(
                asyncio.run(load(server.url, "captions", queries, 16, 600, 10**6, stop))
            )
        )
        clients.start()
        time.sleep(5.0)  # the service warmed by the load: what the swap adds is measured from here
        loaded = memory(server.process.pid)
        started = time.perf_counter()
        build_index(config)
        built = time.perf_counter() - started
        deadline = time.monotonic() + 120
        described = httpx.get(server.url + "/v1/indexes").json()["indexes"][0]
        while described["swaps"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            described = httpx.get(server.url + "/v1/indexes").json()["indexes"][0]
        swapped = time.perf_counter() - started - built
        time.sleep(1.0)
        stop.set()
        clients.join()
        after = memory(server.process.pid)
    finally:
        server.stop()
    figures = {
        "build_s": built,
        "seen_after_commit_s": swapped,
        "load_s": described["load_seconds"],
        "rss_before_gb": before["rss_gb"],
        "rss_under_load_gb": loaded["rss_gb"],
        "rss_after_gb": after["rss_gb"],
        "peak_gb": after["peak_gb"],
        "requests": during["requests"],
        "failed": during["failed"],
        "p99_ms": during["p99"],
    }
    print(
        f"  swap under load (c=16, {added} captions added): build {built:.1f} s, swapped "
        f"{swapped:.1f} s after it, new version loaded in {figures['load_s']:.2f} s; RSS "
        f"{before['rss_gb']:.2f} GB loaded, {loaded['rss_gb']:.2f} under load before the build, "
        f"{after['rss_gb']:.2f} after the swap (peak {after['peak_gb']:.2f}); "
        f"{during['requests']} requests, {during['failed']} failed, p99 {during['p99']:.1f} ms",
        flush=True,
    )
    return figures


def measure(
    name: str, index: Path, levels: list[int], seconds: float, cap: int, rng: np.random.Generator
) -> dict:
    with Retriever.open(index, device="cpu") as r:
        target = "images" if r.store.state("images").index is not None else "captions"
    queries = sentences(4000, rng)
    lib = library(index, target, queries, 10)
    print(
        f"\n{name}: library search_texts {lib['batched_qps']:,.1f} queries/s in batches of 64 "
        f"({lib['batched_qps_16']:,.1f} in batches of 16), "
        f"warm search_text {lib['single_ms']:.2f} ms (target {target})",
        flush=True,
    )
    rows = {}
    for mode, max_batch in (("on", 64), ("off", 1)):
        server = Server(index, max_batch)
        try:
            for concurrency in levels:
                fresh = sentences(cap, rng)
                before = batch_sizes(server.url)
                row = asyncio.run(load(server.url, target, fresh, concurrency, seconds, cap))
                after = batch_sizes(server.url)
                row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                rows[(mode, concurrency)] = row
                print(
                    f"  coalescing {mode:>3}  c={concurrency:<3} {row['qps']:8.1f} q/s  "
                    f"p50 {row['p50']:8.1f} ms  p99 {row['p99']:8.1f} ms  "
                    f"batch {row['mean_batch']:5.1f}  ({row['requests']} requests, {row['failed']} failed)",
                    flush=True,
                )
        finally:
            server.stop()
    at16 = rows.get(("on", 16))
    ratio = at16["qps"] / lib["batched_qps"] if at16 else float("nan")
    added = rows[("on", levels[0])]["p50"] - lib["single_ms"]
    ratio16 = at16["qps"] / lib["batched_qps_16"] if at16 else float("nan")
    print(
        f"  HTTP c=16 (coalescing on) / library batched: {ratio:.2f} (target >= 0.7); "
        f"/ library in batches of 16: {ratio16:.2f}"
    )
    print(f"  added latency at c={levels[0]}: {added:+.2f} ms over a warm library call")
    return {
        "library": lib,
        "load": {f"{m}-{c}": v for (m, c), v in rows.items()},
        "ratio_c16": ratio,
        "ratio_c16_batch16": ratio16,
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
            config = bert_index(Path(work), rng, args.bert_captions)
            figures["bert-base"] = measure(
                "BERT-base caption index", config.out, levels, args.seconds, args.requests, rng
            )
            figures["bert-base"]["swap"] = swap_cost(config, rng, args.bert_captions // 10)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
