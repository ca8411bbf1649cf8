"""What an endpoint serves (``GET /models``), asked before a run sends anything.

An endpoint that does not answer, or that does not list the model a run is about to ask, would
fail every request of the run one by one (each retried with backoff, then recorded failed). One
look at ``/models`` first turns both into a single error naming ``client.base_url`` or
``client.model``, before anything is written. Servers that do not list their models (404, or an
answer in another shape) are not checked.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from biomedvital.llm.errors import shorten
from biomedvital.llm.redact import redact, safe_url


class EndpointError(RuntimeError):
    """The endpoint is down or does not serve the model (reported as one line, nothing sent)."""


def served_models(base_url: str, api_key: str, timeout_s: float = 15.0) -> list[str] | None:
    """The model ids ``GET {base_url}/models`` lists; ``None`` when the server does not list
    them. :class:`EndpointError` when nothing answers or the key is refused."""
    url = f"{base_url.rstrip('/')}/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    where = safe_url(base_url)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise EndpointError(
                f"client.base_url {where}: the endpoint refused the key (HTTP {err.code}); "
                "check the variable client.api_key_env names"
            ) from None
        return None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise EndpointError(
            f"client.base_url {where}: the endpoint does not answer "
            f"({redact(shorten(reason), api_key)}); start its server or correct client.base_url"
        ) from None
    except ValueError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]


def check_served(base_url: str, api_key: str, model: str) -> None:
    """Refuse a run whose model the endpoint does not list (or an endpoint that is down)."""
    models = served_models(base_url, api_key)
    if models is not None and model not in models:
        shown = ", ".join(repr(m) for m in sorted(models)[:10]) or "no model"
        more = f" (and {len(models) - 10} more)" if len(models) > 10 else ""
        raise EndpointError(
            f"client.model {model!r} is not served at {safe_url(base_url)}: it lists {shown}{more}"
        )
