"""Sync turns/second and latency through gunicorn + a Celery worker (offline model),
beside the round-trip rate of a no-op Celery task (the ceiling) in the same run.

    python bench/turns.py [--turns 200] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from _stack import bench_settings, fresh_database, percentile, report, running_stack

from shared.runtime import Runtime
from shared.services import auth
from shared.task_names import TaskName
from worker.celery_app import create_celery_app


def measure_ping(settings, total: int, concurrency: int) -> dict:
    celery_app = create_celery_app(settings, role="bench")
    celery_app.send_task(TaskName.PING, ignore_result=False).get(timeout=30)  # warm-up

    def one(_):
        started = time.perf_counter()
        celery_app.send_task(TaskName.PING, ignore_result=False).get(timeout=30)
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(total)))
    elapsed = time.perf_counter() - started
    return {"rate": total / elapsed, "p50_ms": percentile(latencies, 0.5) * 1000}


def measure_turns(base: str, key: str, total: int, concurrency: int) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        room = client.post("/rooms", json={"name": "bench"}).json()
        # One session per client thread: turns in one session are serialised by design.
        sessions = [
            client.post(f"/rooms/{room['id']}/sessions", json={}).json()["id"] for _ in range(concurrency)
        ]

    def worker(index: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            for n in range(total // concurrency):
                started = time.perf_counter()
                response = client.post(
                    f"/sessions/{sessions[index]}/turns",
                    json={
                        "content": f"Benchmark turn {n}: what is the capital of France?",
                        "max_output_tokens": 64,
                    },
                )
                latencies.append(time.perf_counter() - started)
                if response.status_code != 201 or response.json()["status"] != "completed":
                    raise RuntimeError(f"turn did not complete: {response.status_code} {response.text[:300]}")
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [value for chunk in pool.map(worker, range(concurrency)) for value in chunk]
    elapsed = time.perf_counter() - started
    return {
        "rate": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with fresh_database() as url:
        settings = bench_settings(url)
        # The offline model paces its streamed pieces (OFFLINE_STREAM_DELAY_SECONDS) to look like
        # a model; this bench measures Tollgate's own cost per turn, so the pacing is off.
        with running_stack(settings, OFFLINE_STREAM_DELAY_SECONDS="0") as base:
            runtime = Runtime(settings, role="bench")
            with runtime.db.session() as session:
                _, issued = auth.create_user(session, "bench@example.com", "user")
            runtime.close()
            ping = measure_ping(settings, args.turns, args.concurrency)
            turns = measure_turns(base, issued.secret, args.turns, args.concurrency)
    report(
        "turns",
        {
            "sync_turns_per_s": turns["rate"],
            "sync_turn_p50_ms": turns["p50_ms"],
            "sync_turn_p99_ms": turns["p99_ms"],
            "noop_task_roundtrips_per_s": ping["rate"],
            "noop_task_p50_ms": ping["p50_ms"],
            "ratio_turns_to_noop": turns["rate"] / ping["rate"],
            "concurrency": args.concurrency,
            "turns": args.turns,
        },
    )


if __name__ == "__main__":
    main()
