"""What a grid stage's result depends on, and what changed since it last ran.

A stage's identity is everything that can change its result:

- ``command``: the command line it runs (credentials masked);
- ``configs``: the SHA-256 of every config file it reads: the ``--config`` files (base and
  overlays, the cell's included) and any ``.yaml``/``.yml`` file a config value or argument
  names;
- ``library``: the content hash of the ``biomedvital`` package (tracked files and uncommitted
  edits; a docs-only commit leaves it alone), :func:`~biomedvital.tracking.provenance.library_hash`;
- ``inputs``: the files its manifests hash (``{"path": ..., "sha256": ...}`` entries of its
  ``done`` file and, for Trainer verbs, ``run.<verb>.json``), known once it has run; its own
  outputs (files in its output folders) are left out. An input is re-hashed only when its size
  or modification time moved.

The grid records each finished stage's identity in ``<cell>/stages.json``; a stage whose
identity differs from the one recorded runs again, and so does every later stage of its cell.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMAT = 2  # stages.json format; format 1 held command lines only
CONFIG_SUFFIXES = (".yaml", ".yml")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_state(path: str | Path, known: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``{"sha256", "size", "mtime_ns"}`` of a file, ``None`` when it is missing. The hash is
    taken from ``known`` when size and modification time are those recorded with it (large
    inputs are not read again on every plan)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if (
        known is not None
        and known.get("size") == st.st_size
        and known.get("mtime_ns") == st.st_mtime_ns
        and isinstance(known.get("sha256"), str)
    ):
        return dict(known)
    return {"sha256": sha256_of(Path(path)), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# -- configs ------------------------------------------------------------------------------


def _config_values(argv: list[str]) -> tuple[list[str], list[str]]:
    """The ``--config`` files of a command line and its other option values."""
    files, values = [], []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif not arg.startswith("--"):
            values.append(arg)
        i += 1
    return files, values


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)


def _named_configs(values: list[str] | Iterator[str]) -> list[str]:
    out = []
    for value in values:
        candidates = [value]
        if value.startswith(("[", "{")):  # a JSON list or mapping of paths on the command line
            try:
                candidates = list(_strings(json.loads(value)))
            except ValueError:
                candidates = []
        out += [c for c in candidates if c.endswith(CONFIG_SUFFIXES) and Path(c).is_file()]
    return out


def config_files(argv: list[str]) -> list[str]:
    """Every config file a stage's command reads: its ``--config`` files in order, then the
    YAML files their values or the command's arguments name (followed transitively)."""
    import yaml

    files, values = _config_values(argv)
    found: list[str] = []
    todo = [*files, *_named_configs(values)]
    while todo:
        name = todo.pop(0)
        if name in found:
            continue
        found.append(name)
        try:
            node = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # the stage itself reports an unreadable config
        todo += _named_configs(_strings(node))
    return found


# -- inputs -------------------------------------------------------------------------------


def _hashed_entries(node: Any) -> Iterator[dict[str, Any]]:
    """The ``{"path": ..., "sha256": ...}`` records anywhere in a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get("path"), str) and isinstance(node.get("sha256"), str):
            yield node
        for v in node.values():
            yield from _hashed_entries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _hashed_entries(v)


def _relative(path: Path) -> Path:
    """A path under the working directory (the repository, where make runs) as a relative
    one: the record stays valid when the checkout moves."""
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd())
        except ValueError:
            return path
    return path


def _inside(path: Path, folders: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(f) for f in folders)


def recorded_inputs(
    manifests: list[Path], own_folders: list[Path], previous: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The input files the stage's manifests hash, as ``{path: file_state}``.

    A file's hash is the one its manifest recorded (what the stage read); its size and time
    are kept with it only when the file still has that hash, so an input edited while the stage
    ran reads as changed. A folder entry listing its ``files`` (a benchmark's parquet shards)
    counts each file. Files inside ``own_folders`` are the stage's outputs and left out.
    """
    owned = [f.resolve() for f in own_folders]
    out: dict[str, dict[str, Any]] = {}
    previous = previous or {}
    for manifest in manifests:
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for entry in _hashed_entries(data):
            path = _relative(Path(entry["path"]))
            if isinstance(entry.get("files"), list):
                for name in entry["files"]:
                    file = path / str(name)
                    if not _inside(file, owned):
                        state = file_state(file, previous.get(str(file)))
                        if state is not None:
                            out[str(file)] = state
                continue
            if _inside(path, owned):
                continue
            state = file_state(path, previous.get(str(path)))
            if state is None or state["sha256"] != entry["sha256"]:
                out[str(path)] = {"sha256": entry["sha256"]}  # checked in full next time
            else:
                out[str(path)] = state
    return out


# -- comparison ---------------------------------------------------------------------------


def _options(argv: list[str]) -> dict[str, list[str]]:
    opts: dict[str, list[str]] = {}
    key = ""
    for arg in argv[1:]:
        if arg.startswith("--"):
            key = arg
            opts.setdefault(key, [])
        else:
            opts.setdefault(key, []).append(arg)
    return opts


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def command_change(old: list[str], new: list[str]) -> str:
    """``--top_percent 50 → 25``-style summary of how a command changed (at most three)."""
    if old[:1] != new[:1]:
        return f"verb {old[:1]} → {new[:1]}"
    a, b = _options(old), _options(new)
    parts = []
    for key in [*a, *(k for k in b if k not in a)]:
        if a.get(key) != b.get(key):
            before = " ".join(a[key]) if key in a else "(none)"
            after = " ".join(b[key]) if key in b else "(none)"
            parts.append(f"{key} {_short(before)} → {_short(after)}")
    if not parts:
        parts = ["argument order"]
    more = f" (+{len(parts) - 3} more)" if len(parts) > 3 else ""
    return ", ".join(parts[:3]) + more


def changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why a stage's identity ``now`` differs from the one it ran with; empty when it does not.
    ``now`` has no ``inputs``: they are compared with the files as they are."""
    reasons = []
    if recorded.get("command") != now["command"]:
        reasons.append(
            f"command changed: {command_change(recorded.get('command') or [], now['command'])}"
        )
    old_cfg, new_cfg = recorded.get("configs") or {}, now["configs"]
    for name, digest in new_cfg.items():
        if name not in old_cfg:
            reasons.append(f"config {name} added")
        elif old_cfg[name] != digest:
            reasons.append(f"config {name} changed")
    reasons += [f"config {name} no longer read" for name in old_cfg if name not in new_cfg]
    if recorded.get("library") != now["library"]:
        reasons.append(
            f"library changed ({recorded.get('library') or 'unknown'} → {now['library']})"
        )
    for name, state in (recorded.get("inputs") or {}).items():
        current = file_state(name, state)
        if current is None:
            reasons.append(f"input {name} missing")
        elif current["sha256"] != state.get("sha256"):
            reasons.append(f"input {name} changed")
    return reasons
