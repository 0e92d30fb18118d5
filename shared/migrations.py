"""The Alembic migrations: where they live, the head this code expects, upgrading to it.

Used by ``tollgate migrate``, ``tollgate dev`` and the readiness check; it imports
nothing of the CLI, so each of them can import it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from shared.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def migrate(settings: Settings) -> None:
    """Upgrade the database at DATABASE_URL (never the pooled URL) to head."""
    # Alembic is imported on use, not at the top: it logs its plugin setup on import,
    # and the web and worker processes need it only for the first readiness check.
    from alembic import command
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR.parent / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = settings.database_url
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


@lru_cache(maxsize=1)
def code_migration_head() -> str | None:
    """The Alembic head this code expects (read from the migration scripts)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()
