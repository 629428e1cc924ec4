"""The compliance web console's assets: Jinja2 templates and the stylesheet, shipped as package data and
served by the API process itself (no build step, no CDN). The routes are in service.api.routers.console."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
STATIC_URL = "/console/static"
