"""``tollgate dev``: the embedded stack in one command.

Migrates the SQLite database, creates a dev admin once (its key is kept in
``var/dev-admin.key`` so every start can print it), then runs a real Celery
worker process on the filesystem broker and gunicorn, until Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from sqlalchemy import select

from shared.migrations import migrate
from shared.models import Role, User
from shared.runtime import Runtime
from shared.services import auth
from shared.settings import Settings

DEV_ADMIN_EMAIL = "dev-admin@tollgate.local"


def ensure_dev_admin(settings: Settings) -> str:
    key_file = settings.var_dir / "dev-admin.key"
    runtime = Runtime(settings, role="cli")
    try:
        with runtime.db.session() as session:
            if key_file.exists():
                secret = key_file.read_text().strip()
                try:
                    auth.authenticate(session, secret)
                    return secret
                except Exception:
                    pass  # stale file (database was reset): issue a fresh key below
            admin = session.scalar(select(User).where(User.email == DEV_ADMIN_EMAIL))
            if admin is None:
                _, issued = auth.create_user(session, DEV_ADMIN_EMAIL, Role.ADMIN)
            else:
                issued = auth.issue_api_key(session, admin.id, admin.id, "dev")
    finally:
        runtime.close()
    key_file.write_text(issued.secret + "\n")
    key_file.chmod(0o600)
    return issued.secret


def run_dev(settings: Settings, *, port: int = 8000) -> int:
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings)
    secret = ensure_dev_admin(settings)
    # This command starts every process that writes samples, so it may clear the
    # previous run's (docs/observability.md): counters restart from zero.
    shutil.rmtree(settings.metrics_dir, ignore_errors=True)
    env = dict(os.environ, TOLLGATE_VAR_DIR=str(settings.var_dir))
    bin_dir = os.path.dirname(sys.executable)
    worker = subprocess.Popen(
        [
            os.path.join(bin_dir, "celery"),
            "-A",
            "worker.main",
            "worker",
            "-B",
            "-Q",
            "turns,summaries,files,webhooks",
            "-c",
            "2",
            "--loglevel",
            "INFO",
            "-s",
            str(settings.var_dir / "celerybeat-schedule"),
        ],
        env=env,
    )
    web = subprocess.Popen(
        [
            os.path.join(bin_dir, "gunicorn"),
            "web.wsgi:app",
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            "1",
            "--threads",
            "8",
            "--timeout",
            "120",
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    print(
        "\nTollgate (embedded: SQLite, filesystem broker, offline model)\n"
        f"  dev admin: {DEV_ADMIN_EMAIL}\n"
        f"  API key:   {secret}\n"
        f"  try:       curl -s -H 'Authorization: Bearer {secret}' {base}/auth/me\n"
        f"  docs:      http://127.0.0.1:{port}/api/docs\n"
        "  Ctrl-C to stop.\n",
        flush=True,
    )
    children = [worker, web]

    def _stop(_signum, _frame):
        raise KeyboardInterrupt

    # Stopping `tollgate dev` with SIGTERM must stop its children too, not orphan them.
    signal.signal(signal.SIGTERM, _stop)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0
