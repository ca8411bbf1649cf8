"""``python -m biomedvital``: a user error (bad input record, config, image, busy output folder,
unsafe checkpoint, missing file) ends with one ``biomedvital: error: ...`` line naming the file and
record, exit status 1 (2 for configs); ``BIOMEDVITAL_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import os
import sys

from biomedvital.cli import main

USER_ERRORS = {
    "biomedvital.config_keys": ("ConfigError",),
    "biomedvital.data.report": ("BadRecordError",),
    "biomedvital.data.images": ("UnsafePathError", "ImageLoadError"),
    "biomedvital.data.outputs": ("OutputFolderBusy",),
    "biomedvital.llm.config": ("ClientConfigError",),
    "biomedvital.llm.errors": ("ApiAccessError",),
    "biomedvital.llm.server_common": ("LocalServerError",),
    "biomedvital.llm.served": ("EndpointError",),
    "biomedvital.grid": ("GridError",),
    "biomedvital.tracking.checkpoints": ("UnsafeCheckpointError",),
    "biomedvital.tracking.store_version": ("StoreVersionError",),
}


def user_errors() -> tuple[type[BaseException], ...]:
    """The error classes reported without a traceback (only from modules already imported:
    an error of a class implies its module is loaded)."""
    found: list[type[BaseException]] = [FileNotFoundError]
    for module, names in USER_ERRORS.items():
        if module in sys.modules:
            found += [getattr(sys.modules[module], n) for n in names]
    return tuple(found)


def run() -> None:
    """``main()`` with user errors turned into one line on stderr and a non-zero exit."""
    try:
        main()
    except Exception as e:
        if not isinstance(e, user_errors()) or os.environ.get("BIOMEDVITAL_TRACEBACK"):
            raise
        print(f"biomedvital: error: {e}", file=sys.stderr)
        raise SystemExit(2 if type(e).__name__.endswith("ConfigError") else 1) from None


if __name__ == "__main__":
    run()
