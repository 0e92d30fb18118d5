"""The ``tollgate`` console script."""

from __future__ import annotations

import argparse
import sys

from shared.devserver import run_dev
from shared.errors import DomainError
from shared.logging import configure_logging
from shared.migrations import migrate
from shared.models import Role
from shared.runtime import Runtime
from shared.services import auth, ledger_check, usage
from shared.settings import Settings


def _runtime(settings: Settings) -> Runtime:
    return Runtime(settings, role="cli")


def cmd_create_admin(args, settings: Settings) -> int:
    runtime = _runtime(settings)
    with runtime.db.session() as session:
        try:
            user, issued = auth.create_user(session, auth.normalize_email(args.email), Role.ADMIN)
        except DomainError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    print(f"created admin {user.email} ({user.id}); API key (shown once):")
    print(issued.secret)
    return 0


def cmd_ledger_check(_args, settings: Settings) -> int:
    runtime = _runtime(settings)
    with runtime.db.session() as session:
        mismatches = ledger_check.find_mismatches(session)
        violations = ledger_check.find_violations(session)
    if not mismatches and not violations:
        print(
            "ok: every wallet's balance equals its ledger sum and its held amount its active holds; "
            "no enforced turn overdrew a wallet or was charged more than its hold"
        )
        return 0
    for row in mismatches:
        print(
            f"MISMATCH wallet={row.wallet_id} user={row.user_id} balance={row.balance} "
            f"ledger_sum={row.ledger_sum} held={row.held} active_holds={row.active_holds}"
        )
    for violation in violations:
        print(
            f"VIOLATION {violation.rule} wallet={violation.wallet_id} turn={violation.turn_id} "
            f"{violation.detail}"
        )
    return 1


def cmd_usage_rebuild(_args, settings: Settings) -> int:
    runtime = _runtime(settings)
    with runtime.db.session() as session:
        result = usage.rebuild(session)
    print(
        f"ok: usage rollups rebuilt from the turns: {result.user_rows} per-user rows, "
        f"{result.all_users_rows} all-users rows ({result.all_users_rows_at_30} from :30)"
    )
    for name in ("turns", "input_tokens", "output_tokens", "cost"):
        before, after = getattr(result.before, name), getattr(result.after, name)
        note = "" if before == after else f" ({after - before:+})"
        print(f"  {name}: {before} -> {after}{note}")
    if result.before != result.after:
        print("  (conversation-summary tokens have no turn row and are not rebuilt: docs/usage.md)")
    return 0


def cmd_migrate(_args, settings: Settings) -> int:
    migrate(settings)
    return 0


def cmd_dev(args, settings: Settings) -> int:
    return run_dev(settings, port=args.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollgate")
    sub = parser.add_subparsers(dest="command", required=True)
    create_admin = sub.add_parser("create-admin", help="create an admin and print its API key")
    create_admin.add_argument("--email", required=True)
    create_admin.set_defaults(func=cmd_create_admin)
    sub.add_parser("ledger-check", help="verify the ledger's invariants (docs/billing.md)").set_defaults(
        func=cmd_ledger_check
    )
    sub.add_parser(
        "usage-rebuild", help="recompute the usage rollups from the turns (docs/usage.md)"
    ).set_defaults(func=cmd_usage_rebuild)
    sub.add_parser("migrate", help="upgrade the database (DATABASE_URL) to head").set_defaults(
        func=cmd_migrate
    )
    dev = sub.add_parser("dev", help="run the embedded stack: SQLite, filesystem broker, worker, web")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(func=cmd_dev)
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    configure_logging(settings)
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
