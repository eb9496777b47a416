"""Who may do what on which channel: the namespace rules of SPEC §5, sans I/O.

:class:`Permissions` answers one question, :meth:`Permissions.check`: may this user
(with these token grants) subscribe to / publish on / read the history or presence of
this channel?  It reads the live config (SIGHUP replaces it) and raises
:class:`~fastws.protocol.ProtocolError` with the error code and message the client
gets.  Every transport's session calls it; nothing else decides permissions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastws import channels
from fastws.auth.grants import granted, may_match_prefix
from fastws.codes import Err
from fastws.protocol import ProtocolError

if TYPE_CHECKING:
    from fastws.config import Config, NamespaceConfig

__all__ = ["Permissions", "allowed"]

_RULE_FIELD = {"subscribe": "subscribe", "publish": "publish",
               "history": "history_access", "presence": "presence_access"}


def allowed(rule: str, user: str | None, channel: str) -> int:
    """0 if ``rule`` lets ``user`` act on ``channel``, else the error code
    (401 not authenticated, 403 denied)."""
    if rule == "anyone":
        return 0
    if rule == "api":
        return Err.FORBIDDEN
    if rule == "proxy":     # the node asks the backend ([proxy] subscribe / publish)
        return 0
    if user is None:
        return Err.UNAUTHORIZED
    if rule == "authenticated":
        return 0
    # owner: the rest of the name is the user's id (addresses compare case-insensitively)
    if channels.is_pattern(channel):
        return Err.FORBIDDEN
    return 0 if channels.same_owner(channels.owner_of(channel), user) else Err.FORBIDDEN


class Permissions:
    """The namespace rules of one config (call :meth:`check`)."""

    __slots__ = ("config",)

    def __init__(self, config: Config) -> None:
        self.config = config

    def private(self, channel: str) -> bool:
        """True when ``channel``'s namespace delivers to exact subscribers only
        (``owner`` and ``api`` namespaces: no pattern ever receives them)."""
        return self.config.for_channel(channel).private

    def pattern_reach(self, pattern: str) -> str | None:
        """For a pattern spanning namespaces (``*``, ``*:x``, ``vip*``): the first
        ``authenticated`` namespace it may reach, else None.  (Owner and api
        namespaces never deliver to patterns: see :meth:`private`.)"""
        for name, ns in self.config.namespaces.items():
            if (ns.subscribe == "authenticated" and name != "*"
                    and may_match_prefix(pattern, name + ":")):
                return name
        return None

    def proxied(self, what: str, channel: str) -> bool:
        """True when ``what`` (subscribe or publish) on ``channel`` is decided by the
        application's backend (namespace permission ``"proxy"``): the node asks it after
        :meth:`check` passed."""
        return getattr(self.config.for_channel(channel), what) == "proxy"

    def check(self, what: str, user: str | None, channel: str,
              grants: tuple[str, ...] | None = None, subscribed: bool = False) -> None:
        """Raise ProtocolError unless ``user`` may ``what`` (subscribe, publish, history
        or presence) ``channel``.

        ``grants`` is the ``channels`` claim of the connection's token, if it had one:
        the channel (or every channel a pattern can match) must be one it allows.
        ``subscribed``: the session holds a subscription to ``channel``; where the rule
        ``subscriber`` means the backend's ``"proxy"`` check, only such a session passed
        it (history and presence).
        """
        ns: NamespaceConfig = self.config.for_channel(channel)
        cross = channels.is_pattern(channel) and not channels.namespace_of(channel)
        if cross:
            ns = self.config.namespace("")
        rule = getattr(ns, _RULE_FIELD[what])
        if rule == "subscriber":
            rule = ns.subscribe
            if rule == "proxy" and not subscribed:
                raise ProtocolError(Err.FORBIDDEN, f"permission denied: {what} {channel} "
                                    "(subscribe first: the backend decides who subscribes)")
        code = allowed(rule, user, channel)
        if not code and cross and user is None and (reach := self.pattern_reach(channel)):
            raise ProtocolError(Err.UNAUTHORIZED, f"not authenticated: {channel} may match "
                                f"channels of namespace {reach}, which needs a token")
        if code:
            msg = ("not authenticated" if code == Err.UNAUTHORIZED
                   else f"permission denied: {what} {channel}")
            raise ProtocolError(code, msg)
        if grants is not None and not granted(grants, channel):
            raise ProtocolError(Err.FORBIDDEN, f"permission denied: {what} {channel} "
                                "(not in the token's channels)")
