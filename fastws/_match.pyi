"""Type stubs for the compiled channel matcher (fastws/_match.pyx)."""

from collections.abc import Hashable

__all__ = ["Trie", "glob_match", "is_pattern"]

def glob_match(pattern: str | bytes, channel: str | bytes) -> bool:
    """True if ``channel`` matches the Redis glob ``pattern`` (str is UTF-8 encoded)."""

def is_pattern(name: str) -> bool:
    """True if ``name`` is a glob pattern (holds ``*``, ``?``, ``[`` or ``\\``)."""

class Trie:
    """Subscription registry: exact channels and glob patterns -> keys."""

    def __init__(self, cache_limit: int = 65536) -> None: ...
    def add(self, pattern: str, key: Hashable) -> bool:
        """Register ``key`` under ``pattern`` (exact channel or glob); True if new."""
    def remove(self, pattern: str, key: Hashable) -> bool:
        """Unregister ``key`` from ``pattern``; True if it was registered there."""
    def match(self, channel: str) -> tuple[Hashable, ...]:
        """Distinct keys subscribed to ``channel`` or to a pattern matching it."""
    def count(self) -> int:
        """Distinct channels and patterns with at least one key."""
    def keys(self, pattern: str) -> tuple[Hashable, ...]:
        """Keys registered under exactly this channel or pattern string."""
    def names(self) -> list[str]:
        """Every channel and pattern with at least one key (exact ones first)."""
    def __len__(self) -> int: ...
    def _node_count(self) -> int: ...
    def _cache_size(self) -> int: ...
