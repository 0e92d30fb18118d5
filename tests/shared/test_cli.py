import subprocess
import sys
from decimal import Decimal

from shared.cli import main
from shared.migrations import migrate
from shared.models import LedgerEntry, Wallet
from shared.runtime import Runtime
from shared.settings import Settings


def embedded_env(tmp_path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "CELERY_"))}
    env["TOLLGATE_VAR_DIR"] = str(tmp_path)
    return env


def test_create_admin_prints_the_key_alone_on_its_last_line(tmp_path):
    env = embedded_env(tmp_path)
    subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], env=env, check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "create-admin", "--email", "ops@example.com"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("tg_") and " " not in key
    settings = Settings.from_env(env)
    runtime = Runtime(settings, role="test")
    from shared.services import auth

    with runtime.db.session() as session:
        assert auth.authenticate(session, key).role == "admin"
    runtime.close()
    again = subprocess.run(
        [sys.executable, "-m", "shared.cli", "create-admin", "--email", "ops@example.com"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "already exists" in again.stderr


def test_ledger_check_passes_on_consistent_wallets_and_names_the_broken_one(tmp_path, monkeypatch, capsys):
    settings = Settings.from_env({"TOLLGATE_VAR_DIR": str(tmp_path)})
    migrate(settings)
    monkeypatch.setenv("TOLLGATE_VAR_DIR", str(tmp_path))
    for name in ("DATABASE_URL", "DATABASE_POOL_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    runtime = Runtime(settings, role="test")
    from tests.factories import make_actor

    with runtime.db.session() as session:
        actor = make_actor(session)
        wallet = session.query(Wallet).filter_by(user_id=actor.id).one()
        session.add(
            LedgerEntry(
                wallet_id=wallet.id,
                user_id=actor.id,
                kind="grant",
                amount=Decimal("5"),
                balance_after=Decimal("5"),
                idempotency_key="t1",
                initiated_by=actor.id,
            )
        )
        wallet.balance = Decimal("5")
        session.commit()
    assert main(["ledger-check"]) == 0
    with runtime.db.session() as session:
        wallet = session.query(Wallet).filter_by(user_id=actor.id).one()
        wallet.balance = Decimal("6")  # a balance moved without a ledger row
        session.commit()
        wallet_id = wallet.id
    runtime.close()
    assert main(["ledger-check"]) == 1
    assert wallet_id in capsys.readouterr().out
