"""What a subscription delivers: :class:`Event` and :class:`Subscription`.

Which events belong to a subscription is decided by the server's own rules:
:func:`fastws.channels.is_pattern` and the compiled Redis glob matcher
(:func:`fastws._match.glob_match`), so the client routes exactly as the server does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastws._match import glob_match
from fastws.channels import is_pattern
from fastws.errors import FastWSError, RequestTimeout

if TYPE_CHECKING:
    from fastws.client.client import Client

__all__ = ["Event", "EventCallback", "Subscription"]

EventCallback = Callable[["Event"], Any]


class Event:
    """One ``event`` push: ``channel``, ``data``, ``offset`` and ``epoch`` (and
    ``sender``/``from_``, ``ephemeral``: SPEC §13).

    ``offset`` and ``epoch`` are None for publications without history (e.g. a raw
    Redis ``PUBLISH``). ``recovered`` is True for an event the server replayed while a
    subscription was being recovered after a reconnect (missed while disconnected),
    False for a live one; it takes no part in equality.
    """

    __slots__ = ("channel", "data", "offset", "epoch", "recovered", "sender", "ephemeral")

    def __init__(self, channel: str, data: Any, offset: int | None = None,
                 epoch: str | None = None, recovered: bool = False, *,
                 sender: dict[str, Any] | None = None, ephemeral: bool = False) -> None:
        self.channel = channel
        self.data = data
        self.offset = offset
        self.epoch = epoch
        self.recovered = recovered
        #: the push's ``from`` ({"user", "client"}) for a client's publication (live or
        #: replayed), else None
        self.sender = sender
        #: True for an ephemeral publication (no offset, kept nowhere)
        self.ephemeral = ephemeral

    @property
    def from_(self) -> dict[str, Any] | None:
        """The push's ``from`` (``from`` is a Python keyword): same as :attr:`sender`."""
        return self.sender

    def __repr__(self) -> str:
        return (f"Event(channel={self.channel!r}, offset={self.offset!r}, "
                f"epoch={self.epoch!r}, data={self.data!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.channel, self.offset, self.epoch, self.data) == (
            other.channel, other.offset, other.epoch, other.data)

    __hash__ = None  # type: ignore[assignment]  # data may be unhashable


class Subscription:
    """A channel or pattern subscription of one :class:`Client`.

    ``offset``/``epoch`` hold the position of the last event delivered for it (the
    ``since`` of its next recovery); ``recovered`` is the flag of the latest
    ``subscribed`` reply; ``subscribed`` is True while the current connection holds it
    (False while disconnected or resubscribing). Events go to ``callback`` when one was
    given, else to the client's ``async for``.
    """

    __slots__ = ("client", "channel", "callback", "pattern", "offset", "epoch",
                 "recovered", "subscribed", "active", "error", "_ready", "_live", "_recovering",
                 "last_channel", "last")

    def __init__(self, client: Client, channel: str, callback: EventCallback | None,
                 since: dict[str, Any] | None) -> None:
        self.client = client
        self.channel = channel
        self.callback = callback
        self.pattern = is_pattern(channel)
        self.offset: int | None = since.get("offset") if since else None
        self.epoch: str | None = since.get("epoch") if since else None
        self.last_channel: str | None = since.get("channel") if since else None
        self.recovered: bool | None = None
        self.subscribed = False
        self.active = True
        self.error: FastWSError | None = None
        self._ready: asyncio.Future[None] | None = None
        self._live = asyncio.Event()  # set while ``subscribed`` holds
        self._recovering = False  # a subscribe with ``since`` awaits its reply
        self.last: int | None = None  # ``last`` N of the first subscribe (no position yet)

    def _set_subscribed(self, value: bool) -> None:
        self.subscribed = value
        self._recovering = False
        if value:
            self._live.set()
        else:
            self._live.clear()

    async def wait_subscribed(self, timeout: float | None = None) -> bool | None:
        """Wait until the current connection holds this subscription; return ``recovered``.

        Call it after a reconnect to know how the resubscription ended: the replayed
        events (if any) have been delivered when it returns, and the result is the
        ``recovered`` flag of that ``subscribed`` reply (None when no ``since`` was
        sent). Raises :class:`~fastws.errors.RequestTimeout` past ``timeout``,
        :class:`~fastws.errors.ConnectionClosed` once the client has stopped for good,
        and the subscription's error if the server refused it on a resubscribe.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.error is not None:
                        raise self.error
                    final = self.client._final
                    if final is not None:
                        raise final
                    if self.subscribed:
                        return self.recovered
                    await self._live.wait()
        except TimeoutError:
            raise RequestTimeout(
                f"{self.channel!r} not subscribed within {timeout} s") from None

    def since(self) -> dict[str, Any] | None:
        """The ``since`` position to recover from, or None when nothing was delivered."""
        if self.offset is None:
            return None
        if self.pattern and self.last_channel:  # the server finds it in the namespace log
            return {"offset": self.offset, "epoch": self.epoch or "",
                    "channel": self.last_channel}
        return {"offset": self.offset, "epoch": self.epoch or ""}

    def matches(self, channel: str) -> bool:
        """Whether an event published on ``channel`` belongs to this subscription."""
        if self.pattern:
            return glob_match(self.channel, channel)
        return self.channel == channel

    async def unsubscribe(self) -> None:
        """Stop this subscription (and tell the server if connected)."""
        await self.client._unsubscribe(self)

    def __repr__(self) -> str:
        return (f"Subscription({self.channel!r}, offset={self.offset!r}, "
                f"epoch={self.epoch!r}, active={self.active})")
