"""Serving benchmark: madclip-serve under load (loopback), and madclip-batch against a loop of madclip-infer.

1. Load test. One local Ray (2 CPUs) with one madclip-serve replica (ort-cpu, FP32) per backbone; for each
   of batching on (the bundle's max batch, --batch-wait-ms) and off (one model call per request; switched by
   the deployment's user_config, so the same warm replica serves both) and each concurrency level (1, 4, 16,
   64 clients, aiohttp on 127.0.0.1), send a bounded number of requests (and stop starting new ones after a
   time limit): throughput, p50 / p99 latency, failed requests, and the replica's own count of model calls.
2. Slow clients (madclip-tiny only): good requests (one at a time, real HTTP) timed in rounds that alternate
   between no other traffic and N clients (default 70) trickling request bodies at one byte every 2 s on raw
   sockets (reconnecting whenever the server drops them): p50/p99 of the good requests in each condition,
   their failures, the p99 ratio loaded/unloaded, and what the replica's upload gate did.
3. Archive scoring (madclip-tiny only): `madclip-batch` over a folder of N demo images (one process, its
   own Ray, wall time including Ray's start) against a plain shell-style loop of `madclip-infer FILE`
   (one process per file: timed on a subset and extrapolated, which the table says) and against one
   `madclip-infer FOLDER` process.

    python benchmarks/bench_serve.py                              # madclip-tiny
    python benchmarks/bench_serve.py --backbones madclip-tiny,ViT-B-16 --skip-batch
    python benchmarks/bench_serve.py --skip-load --skip-batch       # the slow-client test only

Writes benchmarks/results/serve.json and prints tables. Client and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import WORK, print_machine, run, table, tool, write_json

SERVE_WORK = WORK / "serve"


def bundle_for(backbone: str, image_size: int) -> Path:
    """An FP32 bundle (max batch 8) of a 1-epoch, 4+4-shot run on demo data (built once, kept in the work dir)."""
    from _common import demo_data

    bundle = SERVE_WORK / "bundles" / backbone
    if (bundle / "metadata.json").is_file():
        return bundle
    run_dir = SERVE_WORK / "runs" / backbone
    if not (run_dir / "checkpoint.safetensors").is_file():
        run(
            [
                tool("madclip-train"),
                "--data",
                str(demo_data()),
                "--out",
                str(run_dir),
                "--backbone",
                backbone,
                "--pretrained",
                "none",
                "--image-size",
                str(image_size),
                "--shots",
                "4",
                "--epochs",
                "1",
                "--no-augment",
                "--force",
            ]
        )
    run([tool("madclip-export"), str(run_dir), "--out", str(bundle), "--max-batch", "8", "--force"])
    return bundle


def demo_images(n_valid: int, n_test: int) -> Path:
    root = SERVE_WORK / "data" / "Brain_AD"
    if not (root / "test").is_dir():
        run(
            [
                tool("madclip-demo-data"),
                "--out",
                str(SERVE_WORK / "data"),
                "--n-valid",
                str(n_valid),
                "--n-test",
                str(n_test),
                "--force",
            ]
        )
    return root


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def load_level(url: str, bodies: list[bytes], concurrency: int, total: int, max_s: float) -> dict:
    """`concurrency` clients posting until `total` requests were sent or `max_s` passed (in-flight ones finish)."""
    import aiohttp

    lat: list[float] = []
    failures: list[str] = []
    sent = 0
    t_start = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < total and time.perf_counter() - t_start < max_s:
            body = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/predict", data=body) as resp:
                    payload = await resp.read()
                    if resp.status != 200:
                        failures.append(f"{resp.status}: {payload[:200]!r}")
                        continue
            except aiohttp.ClientError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            lat.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout
    ) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    wall = time.perf_counter() - t_start
    return {
        "concurrency": concurrency,
        "requests": sent,
        "ok": len(lat),
        "failed": len(failures),
        "failures": failures[:5],
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(lat) / wall, 2),
        "p50_ms": round(_pct(lat, 50) * 1e3, 1) if lat else None,
        "p99_ms": round(_pct(lat, 99) * 1e3, 1) if lat else None,
    }


def _stats(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as r:
        return json.loads(r.read())["replica_stats"]


def load_test(
    backbone: str,
    bundle: Path,
    bodies: list[bytes],
    levels: list[int],
    requests: dict[int, int],
    max_s: float,
    batch_wait_ms: float,
) -> list[dict]:
    import socket

    import ray
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from madclip_runtime.serve.app import build_app
    from madclip_runtime.serve.replica import ServeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, logging_level=logging.WARNING
    )
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(bundle=str(bundle), backend="ort-cpu")
        for batching in (True, False):
            t0 = time.perf_counter()
            serve.run(
                build_app(
                    cfg,
                    num_cpus=1,
                    max_batch_size=None if batching else 1,
                    batch_wait_s=batch_wait_ms / 1e3 if batching else 0.0,
                ),
                name="madclip",
                route_prefix="/",
            )  # the second run only reconfigures the warm replica
            ready_s = time.perf_counter() - t0
            for c in levels:
                before = _stats(url)
                r = asyncio.run(load_level(url, bodies, c, requests[c], max_s))
                after = _stats(url)
                calls = after["model_calls"] - before["model_calls"]
                r.update(
                    backbone=backbone,
                    batching=batching,
                    ready_s=round(ready_s, 1),
                    model_calls=calls,
                    mean_batch=round((after["scans"] - before["scans"]) / calls, 2) if calls else None,
                )
                rows.append(r)
                print(
                    f"{backbone} batching={batching} c={c}: {r['throughput_rps']} req/s, p50 {r['p50_ms']} ms, "
                    f"p99 {r['p99_ms']} ms, failed {r['failed']}, mean batch {r['mean_batch']}",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _trickle(port: int, stop: threading.Event, stats: dict) -> None:
    """One slow client: a 100 kB body announced, one byte every 2 s; reconnect when dropped; until `stop`."""
    import socket

    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
                stats["connections"] += 1
                s.settimeout(2.0)
                while not stop.is_set():
                    s.sendall(b"\x89")
                    try:
                        if s.recv(4096) == b"":
                            break
                        stats["dropped_by_server"] += 1
                        break
                    except socket.timeout:
                        continue
        except OSError:
            stop.wait(0.2)


def _good_round(port: int, bodies: list[bytes], n: int) -> tuple[list[float], list[str]]:
    import http.client

    lat, failures = [], []
    for i in range(n):
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/predict", body=bodies[i % len(bodies)])
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status != 200:
                failures.append(str(resp.status))
                continue
        except (OSError, http.client.HTTPException) as exc:
            failures.append(type(exc).__name__)
            continue
        lat.append(time.perf_counter() - t0)
    return lat, failures


def slow_client_test(bundle: Path, bodies: list[bytes], n_slow: int, rounds: int, per_round: int) -> dict:
    """Good requests' latency without and with `n_slow` trickling clients, in alternating rounds."""
    import socket
    import urllib.request

    import ray
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from madclip_runtime.serve.app import build_app
    from madclip_runtime.serve.replica import ServeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, logging_level=logging.WARNING
    )
    lat = {"unloaded": [], "slow_clients": []}
    fail = {"unloaded": [], "slow_clients": []}
    stats = {"connections": 0, "dropped_by_server": 0}
    res_rounds: list[dict] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(bundle=str(bundle), backend="ort-cpu")
        serve.run(build_app(cfg, num_cpus=1), name="madclip", route_prefix="/")
        _good_round(port, bodies, 5)  # warm
        for r in range(rounds):
            for cond in ("unloaded", "slow_clients") if r % 2 == 0 else ("slow_clients", "unloaded"):
                stop = threading.Event()
                threads = []
                if cond == "slow_clients":
                    threads = [
                        threading.Thread(target=_trickle, args=(port, stop, stats), daemon=True)
                        for _ in range(n_slow)
                    ]
                    for t in threads:
                        t.start()
                    time.sleep(3.0)  # all connected and trickling before the good requests start
                took, f = _good_round(port, bodies, per_round)
                lat[cond] += took
                fail[cond] += f
                res_rounds.append(
                    {
                        "round": r + 1,
                        "condition": cond,
                        "p99_ms": round(_pct(took, 99) * 1e3, 1) if took else None,
                    }
                )
                stop.set()
                for t in threads:
                    t.join(timeout=10)
                print(
                    f"slow-client round {r + 1} {cond}: p99 {_pct(took, 99) * 1e3:.1f} ms, failed {len(f)}",
                    flush=True,
                )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as resp:
            uploads = json.loads(resp.read())["upload_stats"]
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "n_slow_clients": n_slow,
        "rounds": rounds,
        "per_round": per_round,
        "upload_stats": uploads,
        **stats,
        "by_round": res_rounds,
    }
    for cond in lat:
        res[cond] = {
            "requests": len(lat[cond]) + len(fail[cond]),
            "failed": len(fail[cond]),
            "p50_ms": round(_pct(lat[cond], 50) * 1e3, 1) if lat[cond] else None,
            "p99_ms": round(_pct(lat[cond], 99) * 1e3, 1) if lat[cond] else None,
        }
    if lat["unloaded"] and lat["slow_clients"]:
        res["p99_ratio"] = round(_pct(lat["slow_clients"], 99) / _pct(lat["unloaded"], 99), 2)
    return res


def archive_test(bundle: Path, n_images: int, loop_subset: int) -> dict:
    """madclip-batch on N demo images vs a per-file madclip-infer loop (subset, extrapolated) vs one process."""
    root = demo_images(1, max(1, n_images // 2))
    files = sorted((root / "test").glob("*/img/*.png"))[:n_images]
    folder = SERVE_WORK / f"archive{len(files)}"
    if not folder.is_dir() or len(list(folder.iterdir())) != len(files):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in files:
            shutil.copy(f, folder / f"{f.parent.parent.name}_{f.name}")
    out = SERVE_WORK / "batch_out"
    shutil.rmtree(out, ignore_errors=True)
    b = run(
        [
            tool("madclip-batch"),
            str(folder),
            "--bundle",
            str(bundle),
            "--out",
            str(out),
            "--backend",
            "ort-cpu",
            "--ray-num-cpus",
            "2",
            "--actors",
            "1",
            "--summary",
            "csv",
        ]
    )
    resumed = run(
        [
            tool("madclip-batch"),
            str(folder),
            "--bundle",
            str(bundle),
            "--out",
            str(out),
            "--backend",
            "ort-cpu",
            "--ray-num-cpus",
            "2",
            "--summary",
            "csv",
        ]
    )
    subset = sorted(folder.iterdir())[:loop_subset]
    t0 = time.perf_counter()
    for f in subset:
        run([tool("madclip-infer"), str(f), "--bundle", str(bundle), "--backend", "ort-cpu", "--json"])
    loop_per_file = (time.perf_counter() - t0) / len(subset)
    one = run([tool("madclip-infer"), str(folder), "--bundle", str(bundle), "--backend", "ort-cpu", "--json"])
    n = len(files)
    return {
        "images": n,
        "batch_wall_s": round(b.seconds, 1),
        "batch_images_per_s": round(n / b.seconds, 1),
        "batch_rerun_all_done_wall_s": round(resumed.seconds, 1),
        "loop_subset": len(subset),
        "loop_per_file_s": round(loop_per_file, 3),
        "loop_extrapolated_wall_s": round(loop_per_file * n, 1),
        "loop_images_per_s": round(1 / loop_per_file, 2),
        "infer_folder_wall_s": round(one.seconds, 1),
        "infer_folder_images_per_s": round(n / one.seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="madclip-tiny")
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per level (default: max(100, 4 x clients) tiny, max(24, 2 x clients) otherwise)",
    )
    p.add_argument(
        "--max-seconds", type=float, default=30.0, help="stop starting requests after this, per level"
    )
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--batch-images", type=int, default=1000)
    p.add_argument("--loop-subset", type=int, default=20)
    p.add_argument("--skip-batch", action="store_true", help="no madclip-batch comparison")
    p.add_argument("--skip-load", action="store_true", help="no load test")
    p.add_argument("--skip-slow", action="store_true", help="no slow-client test")
    p.add_argument("--slow-clients", type=int, default=70)
    p.add_argument("--slow-rounds", type=int, default=4, help="rounds per condition, alternating")
    p.add_argument("--slow-per-round", type=int, default=25, help="good requests per round")
    args = p.parse_args()
    print_machine()
    levels = [int(x) for x in args.levels.split(",")]
    bodies = [
        f.read_bytes()
        for f in sorted((demo_images(1, max(8, args.batch_images // 2)) / "test").glob("*/img/*.png"))[:16]
    ]
    out_path = Path(__file__).resolve().parent / "results" / "serve.json"
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    load_rows = [
        r
        for r in previous.get("load", [])
        if args.skip_load or r["backbone"] not in args.backbones.split(",")
    ]  # kept unless re-measured
    archive = previous.get("archive")
    slow = previous.get("slow_clients")
    for backbone in args.backbones.split(","):
        bundle = bundle_for(backbone, args.image_size)
        if not args.skip_load:
            tiny = backbone == "madclip-tiny"
            reqs = {c: args.requests or (max(100, 4 * c) if tiny else max(24, 2 * c)) for c in levels}
            load_rows += load_test(
                backbone, bundle, bodies, levels, reqs, args.max_seconds, args.batch_wait_ms
            )
        if backbone == "madclip-tiny" and not args.skip_slow:
            slow = slow_client_test(bundle, bodies, args.slow_clients, args.slow_rounds, args.slow_per_round)
        if backbone == "madclip-tiny" and not args.skip_batch:
            archive = archive_test(bundle, args.batch_images, args.loop_subset)
    table(
        "madclip-serve load test (loopback, 1 replica, ort-cpu FP32)",
        ["backbone", "batching", "clients", "requests", "failed", "req/s", "p50 ms", "p99 ms", "mean batch"],
        [
            [
                r["backbone"],
                "on" if r["batching"] else "off",
                r["concurrency"],
                r["requests"],
                r["failed"],
                r["throughput_rps"],
                r["p50_ms"],
                r["p99_ms"],
                r["mean_batch"],
            ]
            for r in load_rows
        ],
    )
    if slow:
        table(
            f"good requests beside {slow['n_slow_clients']} clients sending 1 byte / 2 s "
            f"(madclip-tiny, 1 replica; rounds alternate)",
            ["condition", "requests", "failed", "p50 ms", "p99 ms"],
            [
                [c, slow[c]["requests"], slow[c]["failed"], slow[c]["p50_ms"], slow[c]["p99_ms"]]
                for c in ("unloaded", "slow_clients")
            ],
        )
        print(
            f"p99 ratio slow_clients / unloaded: {slow.get('p99_ratio')}; "
            f"slow connections {slow['connections']}, "
            f"dropped by the server {slow['dropped_by_server']}; upload gate {slow['upload_stats']}"
        )
    if archive:
        table(
            f"archive scoring, {archive['images']} demo images (madclip-tiny, ort-cpu)",
            ["method", "wall s", "images/s"],
            [
                [
                    "madclip-batch (1 actor, incl. Ray start)",
                    archive["batch_wall_s"],
                    archive["batch_images_per_s"],
                ],
                ["madclip-batch re-run (all done: skipped)", archive["batch_rerun_all_done_wall_s"], None],
                [
                    f"loop of madclip-infer FILE (timed on {archive['loop_subset']}, extrapolated)",
                    archive["loop_extrapolated_wall_s"],
                    archive["loop_images_per_s"],
                ],
                [
                    "madclip-infer FOLDER (one process)",
                    archive["infer_folder_wall_s"],
                    archive["infer_folder_images_per_s"],
                ],
            ],
        )
    write_json(
        "serve.json",
        {
            "load": load_rows,
            "archive": archive,
            "slow_clients": slow,
            "settings": {
                "levels": levels,
                "max_seconds": args.max_seconds,
                "batch_wait_ms": args.batch_wait_ms,
            },
        },
    )


if __name__ == "__main__":
    main()
