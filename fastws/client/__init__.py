"""The fastws Python client (protocol v1, docs/protocol.md sections 4 and 6).

Usage::

    async with fastws.connect("ws://127.0.0.1:8765/ws", token=None) as c:
        await c.subscribe("events:*")
        async for event in c:
            print(event.channel, event.offset, event.data)

The client runs on picows (``picows.ws_connect``) on the running event loop (uvloop or
asyncio). It reconnects by itself with full-jitter exponential backoff, resubscribes
every subscription and recovers each one from the last position it delivered
(``since``), deduplicating events by (channel, offset). It stops for good after a close
in 4500–4999 or a ``disconnect`` push with ``reconnect: false``, except a 4501 "token
expired" when ``token`` is a callable: then it reconnects with a fresh token.

A callable ``token`` whose JWT carries ``exp`` is also refreshed ahead of time, on the
live connection: shortly before ``exp`` the client calls it and sends the new token in an
``auth`` request, so subscriptions and positions carry on without a reconnect (see
:func:`refresh_delay` and :func:`token_expires_in`).

The package is split by concern: :mod:`~fastws.client.client` (:class:`Client`,
:func:`connect`), :mod:`~fastws.client.events` (:class:`Event`, :class:`Subscription`),
:mod:`~fastws.client.tokens` (backoff and token refresh timing) and ``_link`` (the picows
connection). Channel rules are the server's own: :func:`is_pattern` and
:func:`normalize_channel` are :func:`fastws.channels.is_pattern` and
:func:`fastws.channels.normalize`.
"""

from fastws.channels import is_pattern
from fastws.channels import normalize as normalize_channel
from fastws.client.client import Client, connect
from fastws.client.client import TokenSource as TokenSource
from fastws.client.events import Event, Subscription
from fastws.client.events import EventCallback as EventCallback
from fastws.client.outbox import OutboxFull
from fastws.client.tokens import backoff_delay, refresh_delay, token_claims, token_expires_in

__all__ = [
    "Client",
    "Event",
    "OutboxFull",
    "Subscription",
    "backoff_delay",
    "connect",
    "is_pattern",
    "normalize_channel",
    "refresh_delay",
    "token_claims",
    "token_expires_in",
]
