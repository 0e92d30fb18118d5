"""Process entry point for the celery command line: ``celery -A worker.main worker``.

Building the app here (and only here) keeps imports of worker modules free of
side effects.
"""

from shared import metrics
from shared.logging import configure_logging
from shared.settings import Settings
from worker.celery_app import create_celery_app

settings = Settings.from_env()
configure_logging(settings)
metrics.configure(settings)
app = create_celery_app(settings)
