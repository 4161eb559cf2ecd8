"""The Flower app folder that ``flwr run`` bundles, and where Flower's commands are.

Shared by everything that submits runs (the loopback federation, ``fedsilo plan submit``); it imports
nothing of the project, so the coordinator and the silo agent can both use it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedsiloapp"
version = "1.0.0"
description = "fedsilo's Flower app: the code is the installed fedsilo package"
dependencies = []

[tool.flwr.app]
publisher = "fedsilo"

[tool.flwr.app.components]
serverapp = "coordinator.server_app:app"
clientapp = "silo_agent.client_app:app"

[tool.flwr.app.config]
plan-path = ""
submission = ""
resume-from = ""
out-dir = ""
site-dirs = ""
audit-key-dir = ""
witness-keys-dir = ""
node-keys-dir = ""
"""


def write_flower_app(app_dir: Path) -> Path:
    """The Flower app folder ``flwr run`` bundles. Its components live in the installed package."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    (app_dir / "fedsiloapp.py").write_text('"""Components are imported from the installed fedsilo package."""\n', encoding="utf-8")
    return app_dir


def flower_bin(name: str) -> str:
    """A console script of this environment (next to the running Python), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (JSON escapes, minus those TOML lacks: no surrogate pairs, DEL escaped)."""
    import json

    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007F")
