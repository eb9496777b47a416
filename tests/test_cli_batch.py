"""``fastws publish CHANNEL JSON [CHANNEL JSON ...]``: several publications in one batch
request against a real server; a refused item is named on stderr (exit 1)."""

from __future__ import annotations

import json

import pytest

from fastws import cli


def test_publish_several(server, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["publish", "--url", server.http_url, "--api-key", server.api_key,
                     "events:a", "1", "events:b", '{"x": 2}', "events:a", "3"])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    assert [r["offset"] for r in json.loads(out.out)] == [1, 1, 2]
    assert server.publish("events:a", 4)["offset"] == 3


def test_publish_several_with_a_refused_item(server, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    code = cli.main(["publish", "--url", server.http_url, "--api-key", server.api_key,
                     "events:a", "1", "events:*", "2", "events:a", "3"])
    out = capsys.readouterr()
    assert code == 1
    assert [r.get("offset") for r in json.loads(out.out)] == [1, None, 2]
    assert out.err.strip() == ("fastws publish: publication #2 (events:*): HTTP 400: "
                               "channel must not be a pattern (no * ? [ \\)")


@pytest.mark.parametrize(("argv", "expect"), [
    (["events:a", "1", "events:b"], "CHANNEL 'events:b' has no JSON after it"),
    (["events:a", "1", "events:b", "{nope"], "JSON #2: not valid JSON"),
    (["--idempotency-key", "k", "events:a", "1", "events:b", "2"],
     "--idempotency-key: only with one publication"),
])
def test_publish_several_bad_arguments(argv: list[str], expect: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["publish", "--url", "http://127.0.0.1:9", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastws publish: ") and expect in err and err.count("\n") == 1
