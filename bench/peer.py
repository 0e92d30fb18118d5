"""Tollgate beside a plain LLM proxy (LiteLLM) on the same machine, the same fake
OpenAI-compatible upstream and the same client, interleaved.

    python bench/peer.py [--loads 8:0,64:1,256:1] [--seconds 15] [--rounds 2]

- **Upstream**: bench/_upstream.py in its own process (asyncio, HTTP/1.1 keep-alive, never
  the limit); the model name picks its latency (``bench-instant`` answers at once,
  ``bench-1s`` after 1 s).
- **LiteLLM proxy** (a benchmark-only tool, never a project dependency): installed on first
  use into its own virtualenv under ``var/bench-litellm`` (``LITELLM_VERSION``), run with
  2 workers, no database, its master key as the only API key.
- **Tollgate**: the Procfile's processes (gunicorn gevent web, gevent turn worker),
  ``MODEL_PROVIDER=openai`` against the same upstream, **enforcement on**, both models
  priced, a funded wallet: every turn is admitted, held, run, captured and rolled up.
- **Client**: one asyncio process, N concurrent clients each sending one request after
  another for ``--seconds``; LiteLLM and Tollgate alternate for ``--rounds`` rounds per load.
  Tollgate clients each use their own chat session (turns within a session run in order).

Prints req/s, p50/p99 and the Tollgate/LiteLLM ratio per load, then runs
``tollgate ledger-check`` on the database the run billed.

**Streaming rows** (``--stream-loads``, default ``64:1``): the same clients stream instead
(``stream: true`` + ``stream_options.include_usage``; the upstream streams its answer in
chunks, the last at the model's latency: bench/_upstream.py): LiteLLM's ``/v1/chat/completions`` against
Tollgate's own OpenAI-compatible ``/v1/chat/completions`` (each client in its own session,
``X-Tollgate-Session``). Reported: streamed turns/s and the time to first token (the first
chunk with text) p50/p99 on each side. ``--sides tollgate`` runs Tollgate alone (no
LiteLLM install, no ratios), for a quick look.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from _client import Request, drive, drive_stream
from _stack import (
    BIN,
    ROOT,
    bench_settings,
    env_for,
    free_port,
    fresh_database,
    report,
    running_stack,
    stop,
    wait_ready,
)

from shared.runtime import Runtime
from shared.services import auth, billing, pricing

LITELLM_VERSION = "1.108.7"
LITELLM_KEY = "sk-tollgate-bench-0123456789abcdef"
LITELLM_VENV = ROOT / "var" / "bench-litellm"
MODELS = {0.0: "bench-instant", 1.0: "bench-1s"}


def ensure_litellm() -> Path:
    """The LiteLLM proxy executable, installed into its own venv on first use."""
    executable = LITELLM_VENV / "bin" / "litellm"
    stamp = LITELLM_VENV / f".installed-{LITELLM_VERSION}"
    if not stamp.exists():
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
            check=True,
        )
        stamp.touch()
    return executable


@contextmanager
def upstream(log):
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "_upstream.py"), "--port", str(port)]
    for seconds, model in MODELS.items():
        argv += ["--latency", f"{model}={seconds}"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/stats", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield base
    finally:
        stop([process])


@contextmanager
def litellm_proxy(upstream_base: str, var_dir: Path, log):
    executable = ensure_litellm()
    config = var_dir / "litellm.yaml"
    entries = "".join(
        f"  - model_name: {model}\n"
        f"    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {upstream_base}\n"
        f"      api_key: fake\n"
        for model in MODELS.values()
    )
    config.write_text(f"model_list:\n{entries}litellm_settings:\n  telemetry: false\n")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DATABASE_", "REDIS_"))}
    env.update(
        LITELLM_LOG="ERROR",
        NO_DOCS="True",
        DISABLE_ADMIN_UI="True",
        LITELLM_TELEMETRY="False",
        # Offline machine: use the bundled price map instead of retrying GitHub at start-up
        # (the retries outlast uvicorn's worker health check, which then kills the workers).
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        # No database: the master key is the only key, checked on every request (Tollgate
        # checks its API key too).
        LITELLM_MASTER_KEY=LITELLM_KEY,
    )
    process = subprocess.Popen(
        [
            str(executable),
            "--config",
            str(config),
            "--port",
            str(port),
            "--num_workers",
            "2",
            # A loaded 2-core machine imports LiteLLM slower than uvicorn's default 5 s check.
            "--timeout_worker_healthcheck",
            "120",
        ],
        cwd=var_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/health/liveliness", Path(log.name), timeout=180)
        yield base
    finally:
        stop([process])


def litellm_request(model: str):
    headers = {"Authorization": f"Bearer {LITELLM_KEY}"}

    def request(index: int) -> Request:
        return Request(
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": f"Client {index}: what is the capital of France?"}],
                "max_tokens": 64,
            },
            headers,
        )

    return request, lambda status, body: status == 200


def tollgate_request(key: str, sessions: list[str], model: str):
    headers = {"Authorization": f"Bearer {key}"}

    def request(index: int) -> Request:
        return Request(
            f"/api/v1/sessions/{sessions[index]}/turns",
            {
                "content": f"Client {index}: what is the capital of France?",
                "model": model,
                "max_output_tokens": 64,
            },
            headers,
        )

    return request, lambda status, body: status == 201 and (body or {}).get("status") == "completed"


def litellm_stream_request(model: str):
    request, _ = litellm_request(model)

    def streamed(index: int) -> Request:
        base = request(index)
        return Request(
            base.path, {**base.body, "stream": True, "stream_options": {"include_usage": True}}, base.headers
        )

    return streamed


def tollgate_stream_request(key: str, sessions: list[str], model: str):
    """Tollgate's OpenAI-compatible endpoint, streamed, each client in its own session."""

    def request(index: int) -> Request:
        return Request(
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": f"Client {index}: what is the capital of France?"}],
                "max_tokens": 64,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            {"Authorization": f"Bearer {key}", "X-Tollgate-Session": sessions[index]},
        )

    return request


def stream_rows(
    figures: dict, sides: dict, clients: int, latency: float, seconds: float, rounds: int
) -> None:
    """Streamed turns/s and time to first token per side, interleaved like the other rows."""
    for port, request in sides.values():
        drive_stream("127.0.0.1", port, request, min(clients, 8), 2.0)
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (port, request) in sides.items():
            results[name].append(drive_stream("127.0.0.1", port, request, clients, seconds))
    label = f"stream_c{clients}_u{latency:g}s"
    for name, runs in results.items():
        figures[f"{label}_{name}_req_per_s"] = sum(r["rate"] for r in runs) / len(runs)
        figures[f"{label}_{name}_ttft_p50_s"] = sorted(r["ttft_p50"] for r in runs)[len(runs) // 2]
        figures[f"{label}_{name}_ttft_p99_s"] = max(r["ttft_p99"] for r in runs)
        figures[f"{label}_{name}_p50_s"] = sorted(r["p50"] for r in runs)[len(runs) // 2]
        figures[f"{label}_{name}_errors"] = sum(r["errors"] for r in runs)
    line = ", ".join(
        f"{name} {figures[f'{label}_{name}_req_per_s']:.1f}/s ttft p50 "
        f"{figures[f'{label}_{name}_ttft_p50_s'] * 1000:.0f} ms "
        f"p99 {figures[f'{label}_{name}_ttft_p99_s'] * 1000:.0f} ms"
        for name in results
    )
    print(f"{label}: {line}", flush=True)


def prepare_tollgate(settings, base: str, clients: int) -> tuple[str, list[str]]:
    """A funded user with one chat session per client; the bench models priced."""
    runtime = Runtime(settings, role="bench")
    with runtime.db.session() as session:
        admin, _ = auth.create_user(session, "bench-admin@example.com", "admin")
        user, issued = auth.create_user(session, "bench-peer@example.com", "user")
        for model in MODELS.values():
            pricing.set_price(session, admin.id, model, Decimal("0.001000"), Decimal("0.002000"))
        billing.grant_credit(
            session,
            actor_id=admin.id,
            user_id=user.id,
            amount=Decimal("1000000"),
            reason="bench",
            idempotency_key=None,
        )
    runtime.close()
    headers = {"Authorization": f"Bearer {issued.secret}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        room = client.post("/rooms", json={"name": "peer"}).json()
        sessions = [
            client.post(f"/rooms/{room['id']}/sessions", json={}).json()["id"] for _ in range(clients)
        ]
    return issued.secret, sessions


@contextmanager
def _nothing():
    yield None


def ledger_check(settings) -> bool:
    result = subprocess.run(
        [str(BIN / "tollgate"), "ledger-check"],
        cwd=ROOT,
        env=env_for(settings),
        capture_output=True,
        text=True,
    )
    print(result.stdout.strip())
    return result.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loads", default="8:0,64:1,256:1", help="clients:upstream-seconds, comma-separated")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--stream-loads", default="64:1", help="streamed rows, clients:upstream-seconds ('' for none)"
    )
    parser.add_argument("--sides", default="litellm,tollgate", help="'tollgate' alone skips LiteLLM")
    args = parser.parse_args()
    loads = [(int(c), float(s)) for c, s in (item.split(":") for item in args.loads.split(",") if item)]
    stream_loads = [
        (int(c), float(s)) for c, s in (item.split(":") for item in args.stream_loads.split(",") if item)
    ]
    with_litellm = "litellm" in args.sides.split(",")
    most_clients = max(clients for clients, _ in loads + stream_loads)

    with fresh_database() as url:
        settings = bench_settings(url, billing_enforcement_enabled=True)
        log = open(settings.var_dir / "peer.log", "wb")  # noqa: SIM115
        with (
            upstream(log) as upstream_base,
            litellm_proxy(upstream_base, settings.var_dir, log) if with_litellm else _nothing() as litellm,
        ):
            with running_stack(
                settings,
                MODEL_PROVIDER="openai",
                OPENAI_BASE_URL=upstream_base,
                OPENAI_API_KEY="fake",
                BILLING_ENFORCEMENT_ENABLED="true",
            ) as base:
                key, sessions = prepare_tollgate(settings, base, most_clients)
                tollgate_port = urlsplit(base).port
                litellm_port = urlsplit(litellm).port if litellm else None
                figures: dict = {}
                for clients, latency in stream_loads:
                    streamed = {
                        "tollgate": (tollgate_port, tollgate_stream_request(key, sessions, MODELS[latency]))
                    }
                    if litellm_port:
                        streamed = {
                            "litellm": (litellm_port, litellm_stream_request(MODELS[latency])),
                            **streamed,
                        }
                    stream_rows(figures, streamed, clients, latency, args.seconds, args.rounds)
                for clients, latency in loads:
                    model = MODELS[latency]
                    sides = {"tollgate": (tollgate_port, *tollgate_request(key, sessions, model))}
                    if litellm_port:
                        sides = {"litellm": (litellm_port, *litellm_request(model)), **sides}
                    # Warm both (connections, prices, pools) before measuring.
                    for port, request, accept in sides.values():
                        drive("127.0.0.1", port, request, accept, min(clients, 8), 2.0)
                    results = {name: [] for name in sides}
                    for _ in range(args.rounds):
                        for name, (port, request, accept) in sides.items():
                            results[name].append(
                                drive("127.0.0.1", port, request, accept, clients, args.seconds)
                            )
                    label = f"c{clients}_u{latency:g}s"
                    for name, runs in results.items():
                        figures[f"{label}_{name}_req_per_s"] = sum(r["rate"] for r in runs) / len(runs)
                        figures[f"{label}_{name}_p50_s"] = sorted(r["p50"] for r in runs)[len(runs) // 2]
                        figures[f"{label}_{name}_p99_s"] = max(r["p99"] for r in runs)
                        figures[f"{label}_{name}_errors"] = sum(r["errors"] for r in runs)
                    line = f"tollgate {figures[f'{label}_tollgate_req_per_s']:.1f} turns/s"
                    if litellm_port:
                        figures[f"{label}_ratio_tollgate_to_litellm"] = (
                            figures[f"{label}_tollgate_req_per_s"] / figures[f"{label}_litellm_req_per_s"]
                        )
                        line = (
                            f"litellm {figures[f'{label}_litellm_req_per_s']:.1f} req/s, {line}, "
                            f"ratio {figures[f'{label}_ratio_tollgate_to_litellm']:.2f}"
                        )
                    print(f"{label}: {line}", flush=True)
            figures["ledger_check_ok"] = int(ledger_check(settings))
        log.close()
    report("peer", figures)


if __name__ == "__main__":
    main()
