"""Tests of the compiled channel matcher (fastws/_match.pyx).

Glob matching is compared with a real redis-server's PSUBSCRIBE (the contract
says "exactly the semantics of Redis PSUBSCRIBE") and with the line-by-line
Python port of Redis' recursive algorithm in fastws/_glob_ref.py.  The trie is
compared with a brute-force model over random adds, removes and matches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastws import _glob_ref
from fastws._match import Trie, glob_match, is_pattern

# Hand-written odd cases: (pattern, channel).  Each is checked against Redis.
EDGE_PATTERNS = [
    "", "*", "**", "***", "?", "??", "[", "[^", "[^]", "[]", "[]]", "[]a]", "[^]]", "[a-",
    "[a-]", "[a-z", "[z-a]", "[a-z]", "[^a-z]", "[-]", "[a-c-e]", "[\\]]", "[\\", "[a\\",
    "\\", "a\\", "\\\\", "\\*", "\\?", "\\[", "\\a", "a*", "*a", "*a*", "a*b", "a*b*c",
    "*:*", "news.*", "h?llo", "h[ae]llo", "h[^e]llo", "h[a-b]llo", "*[", "*[^", "*\\",
    "a*[", "[*]", "[?]", "[[]", "[^^]", "[\\-]", "[a-\\]]", "*a*a*a*a*b", "?*", "*?", "*?*",
    "[é]", "[a-é]", "[é-a]", "é*", "*é", "[^é]",
]
EDGE_CHANNELS = [
    "", "a", "b", "z", "m", "-", "]", "[", "^", "\\", "*", "?", "ab", "abc", "axxbyyc",
    "a:b", "news.x", "news.", "hello", "hallo", "hbllo", "hxllo", "aaaaaaaaab", "aaaaaaaa",
    "é", "aé", "éa", "a\\", "\\a", "[a", "é:é",
]

SPECIALS = list("*?[]^-\\")
GLOB_ALPHABET = SPECIALS * 3 + list("ab:") + ["é"]
CHANNEL_ALPHABET = list("ab:") * 3 + SPECIALS + ["é"]
BYTE_ALPHABET = [bytes([c]) for c in b"*?[]^-\\ab:"] + [b"\x00", b"\x7f", b"\x80", b"\xff"]

patterns_st = st.text(alphabet=st.sampled_from(GLOB_ALPHABET), max_size=8)
channels_st = st.lists(st.text(alphabet=st.sampled_from(CHANNEL_ALPHABET), max_size=7),
                       min_size=1, max_size=12)
bytes_st = st.lists(st.sampled_from(BYTE_ALPHABET), max_size=8).map(b"".join)


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def instantiate(pattern: str, rng: random.Random) -> str:
    """A channel likely (not certain) to match ``pattern``, to keep positives frequent."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("".join(rng.choices("ab:", k=rng.randrange(4))))
        elif c == "?":
            out.append(rng.choice("ab:-]"))
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(pattern[i])
        elif c == "[":
            end = pattern.find("]", i + 2)
            body = pattern[i + 1:end] if end > 0 else pattern[i + 1:]
            out.append(rng.choice(body or "a"))
            i = end if end > 0 else len(pattern)
        else:
            out.append(c)
        i += 1
    return "".join(out)


class RedisGlob:
    """Asks a real redis-server which (pattern, channel) pairs PSUBSCRIBE matches.

    One connection PSUBSCRIBEs to the patterns (the confirmations are read
    before anything is published), another PUBLISHes each channel with its
    index as payload; the pmessages name the pattern that matched, so a whole
    cross product costs three round trips.
    """

    def __init__(self, port: int) -> None:
        # RESP2: under RESP3 redis-py hands (p)subscribe replies to a push handler.
        self.sub = redis.Connection(host="127.0.0.1", port=port, protocol=2)
        self.sub.connect()
        self.pub = redis.Redis(host="127.0.0.1", port=port)

    def close(self) -> None:
        self.sub.disconnect()
        self.pub.close()

    def matches(self, patterns: Iterable[bytes], channels: list[bytes]) -> set[tuple[bytes, bytes]]:
        """The (pattern, channel) pairs Redis delivers."""
        pats = list(dict.fromkeys(patterns))
        self.sub.send_command("PSUBSCRIBE", *pats)
        for n, pat in enumerate(pats, 1):
            assert self.sub.read_response() == [b"psubscribe", pat, n]
        pipe = self.pub.pipeline(transaction=False)
        for i, ch in enumerate(channels):
            pipe.publish(ch, str(i))
        receivers = pipe.execute()
        self.sub.send_command("PUNSUBSCRIBE")
        found: set[tuple[bytes, bytes]] = set()
        delivered = 0
        while True:
            reply = self.sub.read_response()
            if reply[0] == b"pmessage":
                _, pat, ch, data = reply
                assert ch == channels[int(data)]
                found.add((pat, ch))
                delivered += 1
            else:
                assert reply[0] == b"punsubscribe", reply
                if reply[2] == 0:
                    break
        assert delivered == sum(receivers)
        return found

    def check(self, patterns: Iterable[bytes], channels: list[bytes]) -> None:
        """Assert glob_match and the reference agree with Redis on the cross product."""
        pats = list(dict.fromkeys(patterns))
        expected = self.matches(pats, channels)
        for pat in pats:
            for ch in channels:
                want = (pat, ch) in expected
                assert glob_match(pat, ch) == want, (pat, ch, want)
                assert _glob_ref.glob_match(pat, ch) == want, (pat, ch, want)


@pytest.fixture(scope="module")
def oracle(shared_redis) -> Iterator[RedisGlob]:
    g = RedisGlob(shared_redis.port)
    yield g
    g.close()


# ------------------------------------------------------------------ glob vs Redis

def test_edge_cases_match_redis(oracle: RedisGlob) -> None:
    oracle.check([_b(p) for p in EDGE_PATTERNS], [_b(c) for c in EDGE_CHANNELS])


def test_known_answers() -> None:
    assert glob_match("*", "a:b:c")
    assert not glob_match("*", "")  # Redis: '*' never matches the empty channel
    assert glob_match("", "")
    assert glob_match("a*", "a")
    assert glob_match("[z-a]", "m")
    assert glob_match("[^", "x")
    assert not glob_match("[", "[")
    assert glob_match("a\\", "a\\")
    assert glob_match("[\\]]", "]")
    assert not glob_match("[]]", "]")
    assert glob_match("news.[^0-9]*", "news.x1")
    assert glob_match(b"[\x80-\xff]", b"\x90")
    assert not glob_match(b"[a-\xff]", b"\x90")  # bounds compare as signed char, as in Redis
    with pytest.raises(TypeError):
        glob_match(1, "a")  # type: ignore[arg-type]


def test_random_cross_product_matches_redis(oracle: RedisGlob) -> None:
    rng = random.Random(7)
    for _ in range(3):
        pats = ["".join(rng.choices(GLOB_ALPHABET, k=rng.randrange(9))) for _ in range(300)]
        chans = ["".join(rng.choices(CHANNEL_ALPHABET, k=rng.randrange(8))) for _ in range(60)]
        chans += [instantiate(p, rng) for p in pats[:100]] + pats[:20]
        oracle.check([_b(p) for p in pats], [_b(c) for c in dict.fromkeys(chans)])


@settings(database=None, max_examples=800, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns_st, channels=channels_st, rng=st.randoms(use_true_random=False))
def test_hypothesis_matches_redis(oracle: RedisGlob, pattern: str, channels: list[str],
                                  rng: random.Random) -> None:
    derived = [instantiate(pattern, rng) for _ in range(4)]
    oracle.check([_b(pattern)], [_b(c) for c in dict.fromkeys([*channels, *derived, pattern])])


@settings(database=None, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(pattern=bytes_st, channels=st.lists(bytes_st, min_size=1, max_size=10))
def test_hypothesis_bytes_match_redis(oracle: RedisGlob, pattern: bytes,
                                      channels: list[bytes]) -> None:
    oracle.check([pattern], channels)


@settings(database=None, max_examples=2000, deadline=None)
@given(pattern=patterns_st, channel=st.text(alphabet=st.sampled_from(CHANNEL_ALPHABET),
                                            max_size=12))
def test_c_matches_reference(pattern: str, channel: str) -> None:
    assert glob_match(pattern, channel) == _glob_ref.glob_match(pattern, channel)


def test_pathological_pattern_is_fast() -> None:
    # Redis 7.0 skipLongerMatches: no exponential blow-up on many '*'.
    pat = "a*" * 40 + "b"
    assert not glob_match(pat, "a" * 4000)
    assert not _glob_ref.glob_match(pat, "a" * 200)
    assert glob_match("*" * 100_000 + "b", "a" * 1000 + "b")  # no recursion in C


def test_is_pattern() -> None:
    for name in ("a*", "?", "[x", "a\\b"):
        assert is_pattern(name)
    for name in ("", "news", "a]b", "^-:", "é"):
        assert not is_pattern(name)


# ------------------------------------------------------------------ trie

def brute_match(subs: dict[str, dict[object, None]], channel: str) -> set[object]:
    """Keys whose channel equals ``channel`` or whose pattern matches it."""
    out: set[object] = set()
    for name, keys in subs.items():
        if not keys:
            continue
        if name == channel if not is_pattern(name) else _glob_ref.glob_match(name, channel):
            out.update(keys)
    return out


def literal_prefix(name: str) -> bytes:
    raw = name.encode()
    for j, c in enumerate(raw):
        if c in b"*?[\\":
            return raw[:j]
    return raw


def expected_nodes(subs: dict[str, dict[object, None]]) -> int:
    """Nodes a tight trie needs: every prefix of every live pattern's literal prefix."""
    prefixes = set()
    for name, keys in subs.items():
        if keys and is_pattern(name):
            pre = literal_prefix(name)
            prefixes.update(pre[:j] for j in range(len(pre) + 1))
    return len(prefixes)


NAME_POOL = [
    "a", "ab", "a:b", "news", "news.x", "", "é", "a*", "a:*", "*", "?", "a?", "ab*", "a[bc]",
    "news.*", "news.[^x]", "*:b", "[a-z]*", "\\a", "a\\*", "é*", "[", "[^", "*b", "?:?",
]
CHANNEL_POOL = ["a", "ab", "a:b", "news", "news.x", "news.y", "", "é", "éa", "b", "abc",
                "a*", "zz", "x:b", "[", "a:bb"]

ops_st = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "match"]), st.sampled_from(NAME_POOL),
              st.integers(0, 4), st.sampled_from(CHANNEL_POOL)),
    max_size=80,
)


@settings(database=None, max_examples=300, deadline=None)
@given(ops=ops_st, cache_limit=st.sampled_from([0, 1, 3, 65536]))
def test_trie_against_brute_force(ops, cache_limit: int) -> None:
    trie = Trie(cache_limit)
    subs: dict[str, dict[object, None]] = {}
    for op, name, key, channel in ops:
        if op == "add":
            new = key not in subs.setdefault(name, {})
            assert trie.add(name, key) == new
            subs[name][key] = None
        elif op == "remove":
            was = key in subs.get(name, {})
            assert trie.remove(name, key) == was
            subs.get(name, {}).pop(key, None)
        else:
            got = trie.match(channel)
            assert len(got) == len(set(got)), got
            assert set(got) == brute_match(subs, channel), (channel, subs)
        live = [n for n, k in subs.items() if k]
        assert trie.count() == len(trie) == len(live)
        assert sorted(trie.names()) == sorted(live)
        assert trie._node_count() == expected_nodes(subs)
    for name in NAME_POOL:
        assert set(trie.keys(name)) == set(subs.get(name, {}))
    for channel in CHANNEL_POOL:
        assert set(trie.match(channel)) == brute_match(subs, channel)


def test_trie_dedup_and_order() -> None:
    trie = Trie()
    a, b, c = object(), object(), object()
    assert trie.add("news.x", a)
    assert not trie.add("news.x", a)
    assert trie.add("news.*", a)
    assert trie.add("news.*", b)
    assert trie.add("*", c)
    assert trie.add("*", a)
    assert trie.add("n?ws.x", b)
    assert trie.match("news.x") == (a, c, b)  # exact first, then by trie depth
    assert trie.match("news.x") is trie.match("news.x")  # cached
    assert trie.match("other") == (c, a)
    assert trie.keys("news.*") == (a, b)
    assert trie.keys("nope*") == ()
    assert trie.count() == 4
    assert not trie.remove("news.*", c)
    assert not trie.remove("missing", a)
    assert not trie.remove("missing*", a)
    assert trie.remove("news.x", a)
    assert trie.match("news.x") == (c, a, b)
    assert trie.remove("*", c)
    assert trie.match("news.x") == (a, b)
    assert trie.match("other") == (a,)


def test_trie_cache_invalidation_many_cached_channels() -> None:
    trie = Trie()
    trie.add("ch:1", 1)
    channels = [f"ch:{i}" for i in range(2000)]
    for ch in channels:
        trie.match(ch)
    assert trie._cache_size() == len(channels)
    trie.add("ch:1*", 2)  # many cached: whole cache dropped
    assert trie.match("ch:1") == (1, 2)
    assert trie.match("ch:10") == (2,)
    assert trie.match("ch:2") == ()
    trie.remove("ch:1*", 2)
    assert trie.match("ch:10") == ()
    small = Trie(cache_limit=10)
    for ch in channels[:50]:
        small.match(ch)
    assert small._cache_size() <= 10
    small.add("ch:4?", "k")  # few cached: only matching entries dropped
    assert small.match("ch:45") == ("k",)
    assert small.match("ch:4") == ()


def test_trie_memory_returns_to_zero() -> None:
    rng = random.Random(3)
    trie = Trie()
    added = []
    for i in range(3000):
        name = "".join(rng.choices("abc:.", k=rng.randrange(12)))
        name += rng.choice(["", "*", "?", "[ab]", "\\x", "*:*"])
        key = i % 17
        trie.add(name, key)
        added.append((name, key))
    assert trie._node_count() > 100
    rng.shuffle(added)
    for name, key in added:
        trie.remove(name, key)
    assert trie.count() == 0
    assert trie._node_count() == 0
    assert trie.match("abc") == ()
