"""Load test of `dgpt serve`: concurrent streaming chat clients for a fixed time.

    python -m bench.serve_load MODEL_DIR --clients 32 --seconds 60      # starts the server itself
    python -m bench.serve_load --url http://127.0.0.1:8000 --clients 8 --seconds 10

Each client sends streamed chat completions back to back (a handful of different questions,
no seed, so the server may batch them) until the time is up. Prints a table: requests, errors,
p50 / p95 latency (request sent to last event), answer tokens per second over the run (clients'
`usage`) and per decoding second (server), and the batch size histogram scraped from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.serve.process import started_server

QUESTIONS = ["What is 12 plus 30?", "Where was Sam Davis born?", "Sort: pear apple fig", "Count the words: a b c d",
             "Reverse: one two three", "Which is larger, 41 or 14?", "Hello! How are you?", "Repeat: blue fox"]


@dataclass
class LoadReport:
    """What one load run measured."""

    clients: int
    seconds: float
    requests: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list, repr=False)
    completion_tokens: int = 0
    batch_histogram: dict[str, int] = field(default_factory=dict)
    """Batches per size bucket (`le` bound -> batches in it), from the server's dgpt_batch_size."""
    server_tokens_per_decode_second: float = 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def p95(self) -> float:
        if len(self.latencies) < 2:
            return self.p50
        return statistics.quantiles(self.latencies, n=20, method="inclusive")[18]

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds

    def batches_over_one(self) -> int:
        return sum(n for bound, n in self.batch_histogram.items() if float(bound) > 1)

    def summary(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "latencies"}
        return {**data, "p50_s": self.p50, "p95_s": self.p95, "tokens_per_second": self.tokens_per_second}

    def table(self) -> str:
        rows = [("clients", f"{self.clients}"), ("seconds", f"{self.seconds:.1f}"),
                ("requests", f"{self.requests}"), ("errors", f"{self.errors}"),
                ("latency p50", f"{self.p50:.3f} s"), ("latency p95", f"{self.p95:.3f} s"),
                ("answer tokens/s (clients)", f"{self.tokens_per_second:.1f}"),
                ("answer tokens/s (server decoding)", f"{self.server_tokens_per_decode_second:.1f}")]
        rows += [(f"batches of size <= {bound}", f"{n}") for bound, n in self.batch_histogram.items()]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


async def client_loop(http: httpx.AsyncClient, number: int, deadline: float, report: LoadReport,
                      max_tokens: int | None, denoise: bool) -> None:
    """One client: streamed chat completions back to back until `deadline`."""
    for turn in range(10**9):
        if time.monotonic() >= deadline:
            return
        body = {"model": "served", "stream": True, "stream_options": {"include_usage": True}, "denoise": denoise,
                "messages": [{"role": "user", "content": QUESTIONS[(number + turn) % len(QUESTIONS)]}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        start, failure, tokens = time.perf_counter(), None, 0
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    failure = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            failure = chunk["error"]["message"]
                        elif chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as err:
            failure = f"{type(err).__name__}: {err}"
        report.requests += 1
        if failure is None:
            report.latencies.append(time.perf_counter() - start)
            report.completion_tokens += tokens
        else:
            report.errors += 1
            if len(report.error_examples) < 5:
                report.error_examples.append(failure)


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {sample name with labels: value}."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M) if not m[1].startswith("#")}


def batch_histogram(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Batches per dgpt_batch_size bucket during the run (Prometheus buckets are cumulative)."""
    bounds, previous, out = [], 0, {}
    for name in after:
        found = re.fullmatch(r'dgpt_batch_size_bucket\{le="([^"]+)"\}', name)
        if found:
            bounds.append((found[1], after[name] - before.get(name, 0)))
    for bound, cumulative in bounds:
        out[bound.removesuffix(".0")] = int(cumulative - previous)
        previous = cumulative
    return {bound: n for bound, n in out.items() if n}


def run_load(url: str, clients: int, seconds: float, max_tokens: int | None = None,
             denoise: bool = False) -> LoadReport:
    """Run `clients` streaming clients against the server at `url` for `seconds`."""
    report = LoadReport(clients, seconds)
    before = scrape(url)

    async def run_all() -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300), limits=limits) as http:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(client_loop(http, i, deadline, report, max_tokens, denoise)
                                   for i in range(clients)))

    start = time.monotonic()
    asyncio.run(run_all())
    report.seconds = time.monotonic() - start
    after = scrape(url)
    report.batch_histogram = batch_histogram(before, after)
    decode_seconds = after.get("dgpt_decode_seconds_total", 0) - before.get("dgpt_decode_seconds_total", 0)
    tokens = after.get("dgpt_generated_tokens_total", 0) - before.get("dgpt_generated_tokens_total", 0)
    report.server_tokens_per_decode_second = tokens / decode_seconds if decode_seconds else 0.0
    return report


def main(argv: list[str] | None = None) -> LoadReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", help="model folder to serve (not with --url)")
    parser.add_argument("--url", default=None, help="an already running server instead")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default: the canvas)")
    parser.add_argument("--denoise", action="store_true", help="stream the canvas after every step too")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if (args.url is None) == (args.model_dir is None):
        parser.error("give a MODEL_DIR or --url (one of them)")
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(started_server(args.model_dir))
        report = run_load(url, args.clients, args.seconds, args.max_tokens, args.denoise)
    print(report.table())
    for example in report.error_examples:
        print("error:", example)
    if args.json:
        Path(args.json).write_text(json.dumps(report.summary(), indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(1 if main().errors else 0)
