"""``python -m biomedvital.llm.llama_server ARGS``: llama-cpp-python's server (same
arguments as ``python -m llama_cpp.server``) that also reads OpenAI's list-of-parts content.

OpenAI's chat API accepts a message's content as a string or as a list of parts
(``[{"type": "text", "text": ...}, ...]``), and the suite's prompts use parts. llama-cpp-python's
chat formatters read string content only (a list becomes an empty turn), so here the text parts
of each message are joined with newlines before formatting; an image part is refused (the local
models are text-only: configs use ``vision: false``).
"""

from __future__ import annotations

import runpy
from typing import Any

from biomedvital.llm.server_common import die_with_parent


def flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    """The message with list-of-parts content turned into one string (text parts, newlines)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(
                f"a {kind!r} content part: this local model reads text only (use vision: false)"
            )
        texts.append(str(part.get("text") or ""))
    return {**message, "content": "\n".join(texts)}


def _patch() -> None:
    import llama_cpp

    original = llama_cpp.Llama.create_chat_completion

    def create_chat_completion(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            args = ([flatten_content(m) for m in args[0]], *args[1:])
        elif "messages" in kwargs:
            kwargs["messages"] = [flatten_content(m) for m in kwargs["messages"]]
        return original(self, *args, **kwargs)

    llama_cpp.Llama.create_chat_completion = create_chat_completion  # type: ignore[method-assign]


if __name__ == "__main__":
    die_with_parent()
    _patch()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
