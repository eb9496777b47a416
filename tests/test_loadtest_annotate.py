"""The broadcast loop stays plain C: ``cython -a`` scores of its per-delivery lines.

``python -m loadtest.annotate`` annotates fastws/_fanout.pyx and fails when a line of
the per-delivery loops (``Hub.broadcast``, ``Hub.flush``, ``Conn._append``) calls
into the Python C-API; docs/benchmarks.md shows its output.
"""

from __future__ import annotations

from loadtest import annotate


def test_no_python_api_per_delivery(capsys) -> None:
    assert annotate.main() == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "Hub.broadcast, per delivery" in out and "OK" in out


def test_loop_lines_finds_the_loop_body() -> None:
    src = ["def f():", "    x = 1", "    for i in range(3):", "        a = i",
           "        # note", "        b = a", "    return b"]
    assert annotate.loop_lines(src, "def f", "for i in range") == [4, 6]
    assert annotate.loop_lines(src, "def f", None) == [2, 3, 4, 6, 7]
