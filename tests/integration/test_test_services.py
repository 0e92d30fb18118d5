"""scripts/test_services.py keeps a private server's files where the server's user can reach
them: a clone in a directory closed to other users (``mktemp -d``) once left PgBouncer unable
to open its log, and the suite ran without it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.integration.faults import _test_services


@pytest.fixture
def services(tmp_path, monkeypatch):
    module = _test_services()
    checkout = tmp_path / "clone"
    checkout.mkdir(mode=0o700)
    monkeypatch.setattr(module, "STATE", checkout / "var" / "test-services")
    return module


def writable_by(user: str | None, path) -> bool:
    if user is None:
        return os.access(path, os.W_OK)
    return subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(path)]).returncode == 0


def test_a_server_user_that_cannot_reach_the_checkout_gets_a_directory_it_can_write(services):
    user = services.system_user("postgres") if os.geteuid() == 0 else None
    path = services.state_dir("pgbouncer", user)
    assert writable_by(user, path)
    if user is not None:  # as root (CI): the 0700 clone is closed to postgres, so the files live elsewhere
        assert not str(path).startswith(str(services.STATE))
        assert path.name == "pgbouncer"


def test_a_reachable_checkout_keeps_the_files_under_var(services, monkeypatch):
    checkout = Path(tempfile.mkdtemp())  # pytest's tmp_path sits in a 0700 directory of its own
    checkout.chmod(0o755)
    monkeypatch.setattr(services, "STATE", checkout / "var" / "test-services")
    user = services.system_user("postgres") if os.geteuid() == 0 else None
    path = services.state_dir("pgbouncer", user)
    assert path == services.STATE / "pgbouncer"
    assert writable_by(user, path)
    shutil.rmtree(checkout)
