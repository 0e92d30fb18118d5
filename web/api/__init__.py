"""One blueprint module per resource group, all built on :class:`Blueprint` below."""

from __future__ import annotations

import flask_smorest
from marshmallow import RAISE
from webargs.flaskparser import FlaskParser


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint, but a paginated list refuses unknown query parameters (422)
    like every other documented query string, instead of silently ignoring a typo."""

    PAGINATION_ARGUMENTS_PARSER = FlaskParser(unknown=RAISE)
