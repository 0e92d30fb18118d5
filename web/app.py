"""The Flask application factory."""

from __future__ import annotations

import inspect

from flask import Flask, g, request
from flask_smorest import Api
from flask_smorest.pagination import PaginationMetadataSchema
from werkzeug.middleware.proxy_fix import ProxyFix

from shared.logging import new_request_id, request_id_var, sane_request_id
from shared.runtime import Runtime
from shared.settings import Settings
from web import api_docs, auth, finished_turns
from web import metrics as web_metrics
from web.console.views import blp as console_blueprint
from web.context import close_db
from web.errors import register_error_handlers
from web.schemas.common import ErrorSchema, nul_free_strings
from worker.celery_app import create_celery_app

BLUEPRINT_MODULES = (
    "health",
    "me",
    "admin_users",
    "chat",
    "wallet",
    "admin_billing",
    "files",
    "admin_usage",
    "admin_limits",
    "admin_webhooks",
)

# Bodies other than uploads are small; anything beyond this is refused with 413 early.
REQUEST_OVERHEAD_BYTES = 64 * 1024


class TollgateFlask(Flask):
    def ensure_sync(self, func):
        # Flask asks inspect whether each hook and view is a coroutine function, about a
        # dozen times a request; the code flag answers the same for a plain function.
        code = getattr(getattr(func, "__func__", func), "__code__", None)
        if code is not None and not code.co_flags & inspect.CO_COROUTINE:
            return func
        return super().ensure_sync(func)


class TollgateApi(Api):
    ERROR_SCHEMA = ErrorSchema

    def _register_pagination_header(self):
        # X-Pagination holds JSON. A header declared with `schema` is read in OpenAPI's
        # `simple` style (k,v,k,v), which JSON is not; `content` says what it really is.
        self.spec.components.header(
            "PAGINATION",
            {
                "description": "Pagination metadata, JSON-encoded",
                "content": {"application/json": {"schema": PaginationMetadataSchema}},
            },
            lazy=True,
        )


def create_app(settings: Settings | None = None, *, celery_app=None) -> Flask:
    settings = settings or Settings.from_env()
    app = TollgateFlask(__name__)
    app.config.update(
        API_TITLE="Tollgate",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api",
        OPENAPI_JSON_PATH="v1/openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        # Served by this app (web/api_docs.py): no CDN. No validator badge either: Swagger UI
        # would send the spec's URL to validator.swagger.io.
        OPENAPI_SWAGGER_UI_URL=api_docs.ASSETS_URL,
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + REQUEST_OVERHEAD_BYTES,
        JSON_SORT_KEYS=False,
    )
    app.extensions["tollgate"] = Runtime(settings, role="web")
    app.extensions["celery"] = celery_app or create_celery_app(settings, role="web")
    app.extensions["tollgate"].send_task = app.extensions["celery"].send_task

    api = TollgateApi(app)
    api.ma_plugin.converter.add_attribute_function(nul_free_strings)
    auth_doc = auth.AuthDocPlugin()
    auth_doc.init_spec(api.spec)
    api.spec.plugins.append(auth_doc)
    api.spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer", "description": "API key"}
    )
    for name in ("Unauthorized", "Forbidden"):
        api.spec.components.response(
            name, {"description": name, "content": {"application/json": {"schema": "Error"}}}
        )
    from importlib import import_module

    for module in BLUEPRINT_MODULES:
        api.register_blueprint(import_module(f"web.api.{module}").blp)
    # OpenAI's protocol, outside /api/v1 and its spec (docs/openai_compatible.md).
    app.register_blueprint(import_module("web.openai_api").bp)

    app.register_blueprint(api_docs.blp)
    app.register_blueprint(console_blueprint)
    if settings.trusted_proxies:
        # Behind TLS-terminating proxies: their X-Forwarded-* headers say the request was
        # HTTPS, so request.is_secure (and the console's Secure cookie) follow it.
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)

    register_error_handlers(app)
    web_metrics.init_app(app)
    finished_turns.init_app(app)
    app.before_request(_bind_request_id)
    app.before_request(auth.authenticate_request)
    app.after_request(_echo_request_id)
    app.teardown_request(_unbind_request_id)
    app.teardown_appcontext(close_db)
    return app


def _bind_request_id() -> None:
    # Logged and forwarded to the tasks this request sends (worker/celery_app.py).
    g.request_id = sane_request_id(request.headers.get("X-Request-ID")) or new_request_id()
    request_id_var.set(g.request_id)


def _unbind_request_id(_exc: BaseException | None = None) -> None:
    # gunicorn threads are reused: the next request's logs must not inherit this id.
    request_id_var.set(None)


def _echo_request_id(response):
    response.headers["X-Request-ID"] = g.get("request_id", "")
    return response
