"""The baseline for ``bench/overhead.py``: a bare Flask app with one JSON endpoint.

Served by the same gunicorn settings as ``web.wsgi:app`` (``_stack.start_gunicorn``), it
answers a static body shaped and sized like ``GET /api/v1/admin/settings``, so the
difference between the two is Tollgate's own work per request (auth, the key lookup in
Postgres, the enforcement read from Redis, schemas), not framework or transfer cost.

    gunicorn --pythonpath bench '_bare_app:create_app()'
"""

from __future__ import annotations

from flask import Flask

SETTINGS_SHAPED_BODY = {
    "enforcement": {
        "enabled": False,
        "source": "default",
        "default_enabled": False,
        "override": None,
        "updated_by": None,
        "updated_at": None,
    },
    "low_balance_threshold": "1.000000",
    "default_model": "offline-small",
    "model_provider": "offline",
}


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/bare")
    def bare():
        return SETTINGS_SHAPED_BODY

    return app
