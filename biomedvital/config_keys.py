"""A misspelt config key as one line: where it is set, what refused it, and the nearest valid key.

jsonargparse reports an unknown key inside a ``class_path``/``init_args`` block as a nested
dump of every Union alternative it tried (``Does not validate against any of the Union
subtypes ... Option 'ww' is not accepted ... Given value type: NestedArg``). The key, the class
that refused it and the keys that class accepts are all in that dump and the parser; this module
turns them into ``conf/demo/selector.yaml: model.init_args.ww is not an option of
SelectorModule; did you mean w?``. A value outside a switch's choices (a ``Literal``) is
dumped alike and becomes ``the command line: data.init_args.image_aspect_ratio must be one of
'pad', 'crop', got 'square'``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config file or option a verb cannot accept, named with its file and key (here, not in
    ``cli``, so that a stage can raise it without importing the CLI)."""


_OPTION = re.compile(
    r"Option '([^']+)' is not accepted"
    r"|Subcommand '[^']+' does not accept option '([^']+)'"
    r"|unrecognized arguments: --([^\s=]+)"
)
_GROUP = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
_CLASS = re.compile(r"Problem with given class_path '([^']+)'")
_KEY = re.compile(r'Parser key "([^"]+)"')
_HIDDEN = {"help", "config", "print_config"}
_CHOICES = re.compile(r"Expected a typing\.Literal\[(.*)\](?:\. Got value: (.*))?$")
_GIVEN = re.compile(r"^\s*Given value: (.*)$")
_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}
_EXPECTED = re.compile(r"Expected a <class '([\w.]+)'>(?:\. Got value: (.*))?$")


@dataclass(frozen=True)
class UnknownKey:
    """An option a parser refused: its dotted path as the user wrote it (``init_args`` included,
    list positions not yet known), the option itself, and what refused it: the innermost
    ``class_path`` (``owner_class``) or parser group (``group``), else the verb's own options."""

    path: tuple[str, ...]
    option: str
    owner_class: str | None = None
    group: str | None = None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def find_unknown_key(text: str) -> UnknownKey | None:
    """The unknown key in jsonargparse's error text, or ``None`` for any other error.

    The first refused option is taken (in a Union dump the other alternatives fail for other
    reasons, e.g. ``Expected a NoneType``); its ancestors are the less-indented ``Parser key``
    and ``Problem with given class_path`` lines above it, outermost first.
    """
    lines = text.splitlines()
    refused = [i for i, line in enumerate(lines) if _OPTION.search(line) or _GROUP.search(line)]
    if not refused:
        return None
    i = refused[0]
    option_m, group_m = _OPTION.search(lines[i]), _GROUP.search(lines[i])
    ancestors: list[tuple[str, str]] = []
    level = _indent(lines[i])
    for above in reversed(lines[:i]):
        if _indent(above) >= level:
            continue
        level = _indent(above)
        if m := _CLASS.search(above):
            ancestors.append(("class", m.group(1)))
        elif m := _KEY.search(above):
            ancestors.append(("key", m.group(1)))
    path: list[str] = []
    owner_class: str | None = None
    for kind, value in reversed(ancestors):
        if kind == "key":
            path += value.split(".")
            owner_class = None
        else:
            path.append("init_args")
            owner_class = value
    if group_m:
        group = ".".join([*path, group_m.group(1)]) if path else group_m.group(1)
        path += group_m.group(1).split(".")
        return UnknownKey(tuple(path), group_m.group(2), None, group)
    assert option_m is not None
    named = next(g for g in option_m.groups() if g is not None)
    *parents, option = named.split(".")
    path += parents
    group = ".".join(parents) if parents and owner_class is None else None
    return UnknownKey(tuple(path), option, owner_class, group)


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def class_options(cls: type) -> list[str]:
    """The ``init_args`` a class accepts, as jsonargparse sees them (``**kwargs`` passed on to a
    base class included); the plain signature if jsonargparse cannot read the class."""
    try:
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "x", fail_untyped=False, sub_configs=True)
        return _children(parser, "x")
    except Exception:  # noqa: BLE001 - only a suggestion is at stake
        params = inspect.signature(cls).parameters.values()
        return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _children(parser: Any, prefix: str | None) -> list[str]:
    """The option names directly under ``prefix`` (``None``: the top level) of a parser."""
    names: list[str] = []
    for action in getattr(parser, "_actions", []):
        dest = str(getattr(action, "dest", ""))
        if prefix:
            if not dest.startswith(prefix + "."):
                continue
            dest = dest[len(prefix) + 1 :]
        name = dest.split(".")[0]
        if name and name not in _HIDDEN and name not in names:
            names.append(name)
    return names


def _owner(key: UnknownKey, parser: Any, verb: str) -> tuple[str, list[str]]:
    """Who refused the key (a class name, a group's class name, or the verb) and what it accepts."""
    if key.owner_class is not None:
        cls = _import(key.owner_class)
        if cls is None:
            return key.owner_class.rpartition(".")[2], []
        return cls.__name__, class_options(cls)
    if key.group is not None:
        group = getattr(parser, "groups", {}).get(key.group) if parser is not None else None
        cls = getattr(group, "group_class", None)
        name = cls.__name__ if isinstance(cls, type) else key.group
        options = _children(parser, key.group) if parser is not None else []
        if not options and isinstance(cls, type):
            options = class_options(cls)
        return name, options
    return verb, _children(parser, None) if parser is not None else []


def _locate(node: Any, parts: tuple[str, ...]) -> list[str] | None:
    """The path of ``parts`` in a loaded YAML document, list positions filled in (the first
    list element that holds the rest of the path), or ``None`` when the document lacks it."""
    if not parts:
        return []
    if isinstance(node, list):
        for i, item in enumerate(node):
            found = _locate(item, parts)
            if found is not None:
                return [f"[{i}]", *found]
        return None
    if not isinstance(node, dict) or parts[0] not in node:
        return None
    rest = _locate(node[parts[0]], parts[1:])
    return None if rest is None else [parts[0], *rest]


def _dotted(parts: list[str]) -> str:
    return "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(parts))


def unknown_key_message(
    text: str, files: list[str], argv: list[str], parser: Any, verb: str
) -> str | None:
    """``FILE: KEY is not an option of OWNER; did you mean NEAREST?`` for an unknown key in
    jsonargparse's error ``text`` (``None`` for any other error). FILE is the last config file
    that sets the key (overlays win), else ``the command line``; without a close match the
    accepted keys are listed."""
    import yaml

    key = find_unknown_key(text)
    if key is None:
        return None
    full = (*key.path, key.option)
    source, shown = None, _dotted(list(full))
    for name in reversed(files):
        with open(name, encoding="utf-8") as f:
            found = _locate(yaml.safe_load(f), full)
        if found is not None:
            source, shown = name, _dotted(found)
            break
    if source is None:
        flags = [a.split("=")[0] for a in argv if a.startswith("--")]
        typed = [f for f in flags if f.split(".")[-1] == key.option]
        source = "the command line" if typed or not files else ", ".join(files)
        if typed:
            shown = typed[0]
    owner, options = _owner(key, parser, verb)
    near = difflib.get_close_matches(key.option, options, n=1, cutoff=0.5)
    if near:
        hint = f"did you mean {near[0]}?"
    elif options:
        hint = "its options: " + ", ".join(sorted(options))
    else:
        hint = "see --help"
    return f"{source}: {shown} is not an option of {owner}; {hint}"


def _key_path(lines: list[str], i: int) -> list[str]:
    """The dotted path of the key whose error is on line ``i`` of a jsonargparse dump: the
    less-indented ``Parser key`` lines above it, ``init_args`` for each ``class_path``."""
    parts: list[str] = []
    level = _indent(lines[i])
    for above in reversed(lines[:i]):
        if _indent(above) >= level:
            continue
        level = _indent(above)
        if _CLASS.search(above):
            parts.insert(0, "init_args")
        elif m := _KEY.search(above):
            parts[:0] = m.group(1).split(".")
    return parts


def bad_choice_message(text: str, files: list[str], argv: list[str]) -> str | None:
    """``SOURCE: KEY must be one of CHOICES, got VALUE`` for a value outside a ``Literal``'s
    choices in jsonargparse's error ``text`` (``None`` for any other error). SOURCE is the
    command line when a flag sets the key, else the last config file that does."""
    lines = text.splitlines()
    hit = next((i for i, line in enumerate(lines) if _CHOICES.search(line)), None)
    if hit is None:
        return None
    m = _CHOICES.search(lines[hit])
    assert m is not None
    choices, value = m.group(1), m.group(2)
    if value is None:  # ``Literal | None``: the value is given below the alternatives
        below = (_GIVEN.match(line) for line in lines[hit + 1 :])
        value = next((g.group(1) for g in below if g), None)
    path = _key_path(lines, hit)
    if not path or value is None:
        return None
    return f"{_source(path, files, argv)}: {'.'.join(path)} must be one of {choices}, got {value!r}"


def bad_type_message(text: str, files: list[str], argv: list[str]) -> str | None:
    """``SOURCE: KEY must be TYPE, got VALUE`` for a value of the wrong type in jsonargparse's
    error ``text`` (``None`` for any other error). A text option given something YAML reads as a
    list, number or boolean (``[yes, no]`` is ``[True, False]``) is told to quote it."""
    lines = text.splitlines()
    hits = [(i, m) for i, line in enumerate(lines) if (m := _EXPECTED.search(line))]
    if not hits:
        return None
    first, _ = next(((i, m) for i, m in hits if m.group(1) != "NoneType"), hits[0])
    level = _indent(lines[first])
    group = [m for i, m in hits if _indent(lines[i]) == level]  # one Union's alternatives
    wanted = [m.group(1).rsplit(".", 1)[-1] for m in group]
    value = next((m.group(2) for m in group if m.group(2) is not None), None)
    if value is None:  # a Union's alternatives: the value is given below them
        below = (_GIVEN.match(line) for line in lines[first + 1 :])
        value = next((g.group(1) for g in below if g), None)
    path = _key_path(lines, first)
    if not path or value is None or wanted == ["NoneType"]:
        return None
    kinds = [_TYPE_NAMES.get(w, f"a {w}") for w in wanted if w != "NoneType"]
    kind = " or ".join(dict.fromkeys(kinds)) + (" (or null)" if "NoneType" in wanted else "")
    key, source = ".".join(path), _source(path, files, argv)
    message = f"{source}: {key} must be {kind}, got {value}"
    if "str" in wanted:  # YAML read the text as something else
        quoted = f"--{key} '\"[yes, no]\"'" if source == "the command line" else "in quotes"
        message += f" (the value is read as YAML: give it {quoted})"
    return message


def _source(path: list[str], files: list[str], argv: list[str]) -> str:
    """Where a key is set: the command line when a flag sets it, else the last config file that
    does (later files overlay earlier ones)."""
    import yaml

    key = ".".join(path)
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    if f"--{key}" in flags or not files:
        return "the command line"
    for name in reversed(files):
        with open(name, encoding="utf-8") as f:
            if _locate(yaml.safe_load(f), tuple(path)) is not None:
                return name
    return ", ".join(files)
