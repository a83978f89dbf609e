"""Benchmark: the openai backend's throughput against an OpenAI-compatible server with a fixed
latency, and its client CPU cost per call.

The loopback server (tests/loopback_openai.py) runs in a process of its own and answers every
chat completion after `--latency` seconds, so a client that keeps `concurrency` requests in
flight at all times achieves concurrency / latency calls per second: the ideal. One run, side
by side:
- the main run: `--requests` distinct instance requests (a small real patch each, as data URL)
  at `--concurrency`, through `OpenAIBackend.annotate` with the SQLite response cache writing
  every answer, as the annotate stage runs it;
- the main run again with the client's httpx transport instead of aiohttp (`http_client`);
- a concurrency sweep (`--sweep`, 25 rounds of requests each) at the same latency;
- the floor: the same number of the same POSTs at `--concurrency` from a bare asyncio HTTP/1.1
  client (one keep-alive connection per slot, no openai client, no cache, no cleaning), which
  shows what the server and this machine allow, whatever the client.
Printed per run: achieved calls/s, the ideal, their ratio (target >= 0.9 at concurrency 64),
client CPU time per call (process_time of this process, which runs only the client, over the
calls) and the server's count of answers (every request answered once).

Usage: python bench/api_throughput.py [--latency 0.2] [--requests 2000] [--concurrency 64]
                                      [--sweep 8 32 64] [--no-cache]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

KEY_ENV = "GEOPIXELD_BENCH_KEY"
ROUNDS = 25  # sweep requests = rounds x concurrency


def serve(latency: float, conn) -> None:
    """The loopback server in its own process: sends its URL, answers until told to stop,
    then sends how many answers it gave and the most any request got."""
    from loopback_openai import LoopbackOpenAI

    with LoopbackOpenAI(latency_s=latency) as server:
        conn.send(server.base_url)
        while True:
            message = conn.recv()
            if message == "stop":
                break
            counters = server.counters
            conn.send((counters.answers, max(counters.answered.values(), default=0)))
            server.reset_counters()


def patch_png() -> tuple[str, bytes]:
    """A 64 x 64 patch of a bundled iSAID image, as PNG, with its sha256."""
    import cv2

    from pipeline.core.imaging import encode_png, sha256

    bgr = cv2.imread(str(REPO / "data" / "isaid" / "val" / "images" / "P0003.png"))
    png = encode_png(cv2.cvtColor(bgr[200:264, 300:364], cv2.COLOR_BGR2RGB).copy())
    return sha256(png), png


def make_requests(n: int, tag: str, sha: str):
    import prompts
    from schemas import Request

    return [Request(request_id=f"{tag}-{i:06d}", tile_id=f"tile-{i // 8}", kind="instance",
                    prompt=prompts.render("instance", "v1", category_name=f"ship {tag}",
                                          pos="center", mark_number=i + 1),
                    prompt_version="v1", image_sha256=sha, object_ids=[i], category="ship",
                    position="center", mark_number=i + 1)
            for i in range(n)]


def run_once(base_url: str, n: int, concurrency: int, tag: str, use_cache: bool,
             workdir: Path, http_client: str = "auto") -> dict:
    """One timed annotate call: wall time, CPU time of this process, ok answers."""
    from annotators.base import AnnotationContext
    from annotators.cache import ResponseCache
    from annotators.openai_backend import OpenAIBackend
    from pipeline.core.params import BackendParams, OpenAIParams

    sha, png = patch_png()
    requests = make_requests(n, tag, sha)
    params = BackendParams(name="openai", model="gpt-4o-mini", openai=OpenAIParams(
        base_url=base_url, api_key_env=KEY_ENV, concurrency=concurrency, timeout_s=60,
        max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.5, http_client=http_client))
    cache = ResponseCache(workdir / f"{tag}.sqlite") if use_cache else None
    backend = OpenAIBackend(params, cache)
    context = AnnotationContext(tiles={}, images={sha: png})
    cpu, wall = time.process_time(), time.perf_counter()
    responses = backend.annotate(requests, context)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if cache is not None:
        cache.close()
    return {"calls": n, "ok": sum(r.status == "ok" for r in responses), "wall": wall, "cpu": cpu,
            "retries": sum(backend.stats.retries.values())}


def floor_once(base_url: str, n: int, concurrency: int, tag: str) -> dict:
    """The floor: n POSTs of the backend's body shape over `concurrency` keep-alive
    connections from a bare asyncio client."""
    import asyncio
    import base64
    import json
    from urllib.parse import urlsplit

    sha, png = patch_png()
    url = urlsplit(base_url)
    image = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    bodies = [json.dumps({"model": "gpt-4o-mini", "temperature": 0.0, "max_tokens": 128,
                          "seed": 0, "messages": [{"role": "user", "content": [
                              {"type": "image_url", "image_url": {"url": image, "detail": "auto"}},
                              {"type": "text", "text": r.prompt}]}]}).encode()
              for r in make_requests(n, tag, sha)]

    async def worker(queue: list, done: list) -> None:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        while queue:
            body = queue.pop()
            writer.write(f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                         f"Authorization: Bearer x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            answer = json.loads(await reader.readexactly(length))
            done.append(head.startswith(b"HTTP/1.1 200") and bool(answer["choices"]))
        writer.close()

    async def run() -> list:
        queue, done = list(bodies), []
        await asyncio.gather(*[worker(queue, done) for _ in range(concurrency)])
        return done

    cpu, wall = time.process_time(), time.perf_counter()
    done = asyncio.run(run())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"calls": n, "ok": sum(done), "wall": wall, "cpu": cpu, "retries": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server latency, seconds")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sweep", type=int, nargs="*", default=[8, 32, 64])
    parser.add_argument("--no-cache", action="store_true", help="no SQLite response cache")
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "sk-bench")

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    server = ctx.Process(target=serve, args=(args.latency, theirs), daemon=True)
    server.start()
    base_url = ours.recv()
    runs = [("main", args.requests, args.concurrency, "auto"),
            ("httpx", args.requests, args.concurrency, "httpx")]
    runs += [(f"sweep-{c}", ROUNDS * c, c, "auto") for c in args.sweep]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="api-throughput-") as tmp:
            run_once(base_url, 16, 8, "warmup", not args.no_cache, Path(tmp))  # imports, pool
            ours.send("count")
            ours.recv()
            for tag, n, concurrency, http_client in runs:
                result = run_once(base_url, n, concurrency, tag, not args.no_cache, Path(tmp),
                                  http_client)
                ours.send("count")
                answers, most = ours.recv()
                rows.append((tag, concurrency, result, answers, most))
            result = floor_once(base_url, args.requests, args.concurrency, "floor")
            ours.send("count")
            answers, most = ours.recv()
            rows.append(("floor", args.concurrency, result, answers, most))
    finally:
        ours.send("stop")
        server.join(timeout=10)

    from annotators.openai_backend import async_http_client
    from pipeline.core.params import OpenAIParams

    auto = "aiohttp" if async_http_client(OpenAIParams(), "http://127.0.0.1/v1") is not None \
        else "httpx"
    print(f"openai backend vs loopback server: latency {args.latency * 1000:.0f} ms, "
          f"response cache {'off' if args.no_cache else 'on (SQLite)'}, "
          f"transport {auto} (httpx row: httpx), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'run':<10} {'conc':>5} {'calls':>6} {'ok':>6} {'wall s':>7} {'calls/s':>8} "
          f"{'ideal/s':>8} {'ratio':>6} {'CPU ms/call':>12} {'answers':>8} {'max/req':>8}")
    for tag, concurrency, r, answers, most in rows:
        rate = r["calls"] / r["wall"]
        ideal = concurrency / args.latency
        print(f"{tag:<10} {concurrency:>5} {r['calls']:>6} {r['ok']:>6} {r['wall']:>7.2f} "
              f"{rate:>8.1f} {ideal:>8.1f} {rate / ideal:>6.3f} "
              f"{1000 * r['cpu'] / r['calls']:>12.3f} {answers:>8} {most:>8}")
    main_rate = rows[0][2]["calls"] / rows[0][2]["wall"]
    floor_rate = rows[-1][2]["calls"] / rows[-1][2]["wall"]
    ratio = main_rate / (args.concurrency / args.latency)
    print(f"target: ratio >= 0.9 at concurrency {args.concurrency}: "
          f"{'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.3f}); backend / bare-client floor "
          f"on this machine now: {main_rate / floor_rate:.3f}")


if __name__ == "__main__":
    main()
