"""Swagger UI's files for ``/api/docs``, served by this app from the installed
``flask-swagger-ui`` package (its ``dist`` folder is swagger-ui-dist): the docs page
loads nothing from another host and works offline."""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, send_from_directory

ASSETS_URL = "/api/docs/assets/"
SWAGGER_UI_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js")

blp = Blueprint("api_docs_assets", __name__, url_prefix=ASSETS_URL.rstrip("/"))


def dist_folder() -> str:
    return str(files("flask_swagger_ui") / "dist")


@blp.get("/<any(" + ", ".join(f'"{name}"' for name in SWAGGER_UI_FILES) + "):filename>")
def asset(filename: str):
    return send_from_directory(dist_folder(), filename, max_age=86400)
