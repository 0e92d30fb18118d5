"""Black box: the Procfile's release, web and worker lines, run as ops would, against Postgres + Redis."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time

import httpx
import pytest

from tests.integration.conftest import ROOT, service_env


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expand(command: str, env: dict[str, str]) -> list[str]:
    command = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), command)
    return shlex.split(command)


@pytest.fixture
def fresh_settings(pg_settings, new_pg_database, tmp_path):
    return pg_settings.replace(database_url=new_pg_database(), var_dir=tmp_path)


def test_procfile_has_a_process_type_per_pool():
    lines = procfile()
    assert set(lines) == {"release", "web", "worker", "worker_files", "worker_webhooks", "beat"}
    # I/O pools for the turn path, a process pool for CPU-bound extraction, each sized by env.
    assert "--worker-class gevent" in lines["web"] and "${WEB_CONNECTIONS:-" in lines["web"]
    assert "-Q turns,summaries --pool gevent" in lines["worker"]
    assert "${TURN_WORKER_CONCURRENCY:-" in lines["worker"]
    assert "-Q files --pool prefork" in lines["worker_files"]
    assert "${FILE_WORKER_CONCURRENCY:-" in lines["worker_files"]
    # Webhook deliveries wait on receivers: an I/O pool of their own (docs/webhooks.md).
    assert "-Q webhooks --pool gevent" in lines["worker_webhooks"]
    assert "${WEBHOOK_WORKER_CONCURRENCY:-" in lines["worker_webhooks"]


def test_release_web_and_worker_serve_readiness_and_ping(fresh_settings, tmp_path):
    port = free_port()
    env = service_env(fresh_settings, PORT=str(port), WEB_CONCURRENCY="2")
    lines = procfile()
    release = subprocess.run(
        expand(lines["release"], env), cwd=ROOT, env=env, capture_output=True, timeout=120
    )
    assert release.returncode == 0, release.stderr.decode()[-2000:]
    admin = subprocess.run(
        ["tollgate", "create-admin", "--email", "ops@example.test"], cwd=ROOT, env=env, capture_output=True
    )
    assert admin.returncode == 0, admin.stderr.decode()[-2000:]
    admin_key = admin.stdout.decode().strip().splitlines()[-1]

    names = ("web", "worker", "worker_files", "worker_webhooks")
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in names}  # noqa: SIM115
    processes = {
        name: subprocess.Popen(
            expand(lines[name], env),
            cwd=ROOT,
            env=env,
            stdout=logs[name],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name in names
    }
    try:
        url = f"http://127.0.0.1:{port}/api/v1/health/ready?worker=true"
        deadline = time.monotonic() + 60
        last = None
        while time.monotonic() < deadline:
            try:
                last = httpx.get(url, timeout=10, headers={"Authorization": f"Bearer {admin_key}"})
                if last.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert last is not None and last.status_code == 200, (
            last.text if last else (tmp_path / "web.log").read_text()[-3000:]
        )
        body = last.json()
        assert body["checks"]["worker"] == {"ok": True}
        assert body["checks"]["migrations"]["ok"] is True
        assert all(process.poll() is None for process in processes.values())  # every pool is up
        # The web process logged which database URL it chose, password masked.
        assert "from DATABASE_URL" in (tmp_path / "web.log").read_text()
    finally:
        for process in processes.values():
            os.killpg(process.pid, 15)
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
        for log in logs.values():
            log.close()
