"""Channel templates: where each indexed event is published (sans I/O).

A chain's ``channels`` setting is a list of templates (default
:data:`DEFAULT_CHANNELS`: ``events:{event}`` and ``market:{address}``).  Fields:

=================  ==========================================================
``{event}``        the event's name in snake_case (``bet_placed``)
``{Event}``        the event's name as the ABI spells it (``BetPlaced``)
``{address}``      the emitting contract, lowercase 0x hex
``{network}``      the chain's name (its ``[chains.NAME]`` table)
``{chain_id}``     the chain id, in decimal
``{args.NAME}``    the event's argument ``NAME``: integers in decimal, booleans
                   ``true``/``false``, bytes and addresses lowercase 0x hex
=================  ==========================================================

E.g. ``"wallet:{args.bettor}"`` sends each bet to its bettor's private channel.  A
template naming an argument the event lacks (or one that is not a scalar, or whose
value would not make a valid channel name, such as a string with spaces) is skipped
for that event; a malformed template raises :class:`TemplateError` when parsed, so
the indexer refuses to start.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastws.channels import ChannelError, validate

__all__ = ["DEFAULT_CHANNELS", "ChannelTemplate", "Channels", "TemplateError", "parse_all"]

DEFAULT_CHANNELS: tuple[str, ...] = ("events:{event}", "market:{address}")
FIELDS = ("event", "Event", "address", "network", "chain_id")
_FIELD = re.compile(r"\{([^{}]*)\}")
_ARG = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateError(ValueError):
    """A channel template that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class ChannelTemplate:
    """One parsed template: literal text and fields, alternating."""

    text: str
    parts: tuple[tuple[bool, str], ...]     # (is_field, literal text or field name)

    @classmethod
    def parse(cls, text: object) -> ChannelTemplate:
        """Parse ``text``; raises :class:`TemplateError` naming what is wrong."""
        if not isinstance(text, str) or not text:
            raise TemplateError(f"{text!r} is not a non-empty string")
        parts: list[tuple[bool, str]] = []
        pos = 0
        for m in _FIELD.finditer(text):
            parts.append((False, text[pos:m.start()]))
            name = m.group(1)
            if name.startswith("args."):
                arg = name[len("args."):]
                if not _ARG.fullmatch(arg):
                    raise TemplateError(f"{text!r}: {{{name}}} does not name an argument "
                                        "(args.NAME, NAME an identifier)")
            elif name not in FIELDS:
                raise TemplateError(f"{text!r}: unknown field {{{name}}} (known: "
                                    + ", ".join(f"{{{f}}}" for f in FIELDS)
                                    + ", {args.NAME})")
            parts.append((True, name))
            pos = m.end()
        parts.append((False, text[pos:]))
        for is_field, literal in parts:
            if not is_field and ("{" in literal or "}" in literal):
                raise TemplateError(f"{text!r}: unbalanced {{ or }}")
        sample = "".join(p if not f else "x" for f, p in parts)
        try:
            validate(sample, allow_pattern=False)
        except ChannelError as exc:
            raise TemplateError(f"{text!r} does not make a channel name: {exc}") from None
        return cls(text, tuple((f, p) for f, p in parts if f or p))

    def render(self, fields: Mapping[str, str], args: Mapping[str, Any]) -> str | None:
        """The channel for one event, or None when an argument is missing (or not a
        scalar) or the result is not a valid channel name."""
        out: list[str] = []
        for is_field, part in self.parts:
            if not is_field:
                out.append(part)
            elif part.startswith("args."):
                value = _scalar(args.get(part[5:], _MISSING))
                if value is None:
                    return None
                out.append(value)
            else:
                out.append(fields[part])
        name = "".join(out)
        try:
            return validate(name, allow_pattern=False)
        except ChannelError:
            return None


_MISSING = object()


def _scalar(value: Any) -> str | None:
    if value is _MISSING or value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):      # decimal strings of big ints, 0x hex (lowercase)
        return value.lower() if value.startswith("0x") else value
    return None                     # lists, structs: nothing to name a channel with


class Channels:
    """A chain's templates, rendered per event (duplicates dropped, order kept)."""

    def __init__(self, templates: Iterable[str] = DEFAULT_CHANNELS) -> None:
        self.templates: tuple[ChannelTemplate, ...] = tuple(
            ChannelTemplate.parse(t) for t in templates)
        if not self.templates:
            raise TemplateError("no channel template (an empty list publishes nothing)")

    @property
    def texts(self) -> list[str]:
        """The templates as written."""
        return [t.text for t in self.templates]

    def render(self, data: Mapping[str, Any], event: str, network: str,
               chain_id: int) -> list[str]:
        """The channels of one event's ``data`` (``eventType``, ``marketAddress``,
        ``args``); ``event`` is its snake_case name."""
        fields = {"event": event, "Event": str(data["eventType"]),
                  "address": str(data["marketAddress"]).lower(), "network": network,
                  "chain_id": str(chain_id)}
        args = data.get("args") or {}
        out: list[str] = []
        for t in self.templates:
            channel = t.render(fields, args)
            if channel is not None and channel not in out:
                out.append(channel)
        return out


def parse_all(templates: object) -> Channels:
    """:class:`Channels` of a config value; raises TemplateError naming the bad one."""
    if not isinstance(templates, (list, tuple)):
        raise TemplateError("must be an array of channel templates")
    for t in templates:
        if not isinstance(t, str):
            raise TemplateError(f"{t!r} is not a string")
    return Channels(templates)
