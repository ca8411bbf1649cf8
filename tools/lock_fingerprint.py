"""The fingerprint of what requirements.lock was resolved from, kept in the lock's header.

``make lock`` resolves pyproject.toml's dependencies and every extra (under
requirements-pins.txt) into requirements.lock, then writes this fingerprint into it: a digest of
``requires-python``, the dependency lists and the pins, as parsed (comments and layout do not
count). tests/test_lock.py recomputes it, so a dependency changed in pyproject.toml without
``make lock`` fails the suite.

    python tools/lock_fingerprint.py --write requirements.lock    # after uv pip compile
    python tools/lock_fingerprint.py --check requirements.lock    # exit 1 when stale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "# pyproject fingerprint: "


def pins(path: Path) -> list[str]:
    """The requirement lines of a pins file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return sorted(line for line in lines if line)


def fingerprint(root: Path = ROOT) -> str:
    """``sha256:<hex>`` of the lock's inputs: requires-python, dependencies, extras, pins."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "pins": pins(root / "requirements-pins.txt"),
    }
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def recorded(lock: Path) -> str | None:
    """The fingerprint written in the lock's header, if any."""
    for line in lock.read_text().splitlines():
        if line.startswith(PREFIX):
            return line.removeprefix(PREFIX).strip()
        if line and not line.startswith("#"):
            return None
    return None


def write(lock: Path, value: str) -> None:
    """Put ``value`` in the lock's header (after uv's comment lines), replacing an older one."""
    lines = [line for line in lock.read_text().splitlines() if not line.startswith(PREFIX)]
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    lines.insert(at, PREFIX + value)
    lock.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="LOCK", type=Path)
    mode.add_argument("--check", metavar="LOCK", type=Path)
    args = parser.parse_args()
    if args.write:
        write(args.write, fingerprint())
        return 0
    if recorded(args.check) != fingerprint():
        print(f"{args.check} is stale: pyproject.toml changed since it was written (make lock)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
