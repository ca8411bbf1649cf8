"""Print the uv options that give uv the package sources pip is configured with on this machine.

``make setup`` installs ``requirements.lock`` with ``uv pip sync``. The lock holds names, versions
and hashes only; where the files come from is each machine's business. uv reads neither pip's
configuration files nor its ``PIP_*`` variables, so a machine whose pip finds torch in a local
wheel folder or a ``file://`` index would have uv download it again: this reads pip's settings
(``pip config list``: files and environment, environment first) and prints them as uv options.
With more than one source, uv takes each package from the first source that has the locked
version (``unsafe-best-match`` across sources is safe here: every file must match a hash in
the lock). Prints nothing where pip has no such settings (uv then uses PyPI).

    python3 tools/uv_sources.py      # e.g. --find-links /opt/wheels --extra-index-url file://...
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys

# pip's precedence: environment over [install] over [global]
SECTIONS = (":env:", "install", "global")


def pip_settings(python: str = sys.executable) -> dict[str, str]:
    """pip's configured values by option name, the highest-precedence section winning."""
    try:
        out = subprocess.run(
            [python, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        key, sep, raw = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in SECTIONS:
            continue
        try:
            value = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw.strip("'\"")
        found.setdefault(name, {})[section] = str(value)
    return {name: next(by[s] for s in SECTIONS if s in by) for name, by in found.items()}


def uv_options(settings: dict[str, str]) -> list[str]:
    """The uv command-line options equivalent to pip's source settings."""
    options: list[str] = []
    for folder in settings.get("find-links", "").split():
        options += ["--find-links", folder]
    if settings.get("index-url"):
        options += ["--index-url", settings["index-url"]]
    for url in settings.get("extra-index-url", "").split():
        options += ["--extra-index-url", url]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        options.append("--no-index")
    if len(options) > 2 or "--extra-index-url" in options:  # several sources
        options += ["--index-strategy", "unsafe-best-match"]
    return options


if __name__ == "__main__":
    print(shlex.join(uv_options(pip_settings())))
