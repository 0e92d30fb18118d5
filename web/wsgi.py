"""gunicorn entry point: ``gunicorn web.wsgi:app``."""

from shared import metrics
from shared.logging import configure_logging
from shared.settings import Settings
from web.app import create_app

settings = Settings.from_env()
configure_logging(settings)
metrics.configure(settings)
app = create_app(settings)
