"""``cython -a`` check of the broadcast loop: ``python -m loadtest.annotate``.

Runs ``cython -a`` on fastws/_fanout.pyx into a temporary directory, reads the score
Cython gives each source line (0: plain C; more: Python C-API calls, reference
counting, error handling) and prints the lines of the per-delivery and per-write
loops (the bodies of the ``for`` loops in ``Hub.broadcast`` and ``Hub.flush``, and
``Conn._append`` that every delivery calls) with their scores.  Exit status 1 if a
per-delivery line has a non-zero score other than the allowed ones (the enqueue
reference of a connection's first delivery in a pass, the reference drop after its
write, the write itself).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["line_scores", "loop_lines", "main"]

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "fastws" / "_fanout.pyx"
# per-connection-per-pass lines allowed to touch Python (a refcount macro, the write), and
# the delivery to a relay receiver (SSE / long-poll of fastws.fallback: a Python call by
# design, for those receivers only; a WebSocket receiver never reaches that line), and
# the compressed frame, built once per publication inside the loop
ALLOWED = ("Py_XINCREF(o)", "Py_XDECREF(o)", "._write_out()", "self._slow(",
           "(<object>o).deliver(frame)",
           # built once per publication (the first receiver that negotiated deflate)
           "zframe = _deflate_frame(frame)", "zptr = PyBytes_AS_STRING(zframe)",
           "zsize = PyBytes_GET_SIZE(zframe)")


def line_scores(source: Path = SOURCE) -> dict[int, int]:
    """Line number → Cython annotation score of ``source``."""
    import picows

    picows_dir = os.path.dirname(os.path.dirname(picows.__file__))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.c"
        subprocess.run([sys.executable, "-m", "cython", "-3", "-a", "-I", picows_dir,
                        "-I", str(ROOT), "-X", "boundscheck=False", "-X", "wraparound=False",
                        "-X", "cdivision=True", str(source), "-o", str(out)],
                       check=True, capture_output=True, text=True)
        html = out.with_suffix(".html").read_text()
    return {int(m.group(2)): int(m.group(1)) for m in re.finditer(
        r'<pre class="cython line score-(\d+)"[^>]*>.{0,12}?<span class="">(\d+)</span>:',
        html)}


def loop_lines(src: list[str], header: str, loop: str | None) -> list[int]:
    """1-based numbers of the lines inside the first ``loop`` after ``header`` (None:
    the body of the function ``header`` opens)."""
    start = next(i for i, line in enumerate(src) if header in line)
    at = start if loop is None else next(
        i for i in range(start, len(src)) if src[i].strip().startswith(loop))
    indent = len(src[at]) - len(src[at].lstrip())
    body = []
    for i in range(at + 1, len(src)):
        line = src[i]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        if line.strip() and not line.strip().startswith("#"):
            body.append(i + 1)
    return body


def main(argv: list[str] | None = None) -> int:
    """Print the scores of the hot loops; 1 if a per-delivery line is not plain C."""
    src = SOURCE.read_text().splitlines()
    scores = line_scores()
    regions = [("Hub.broadcast, per delivery", loop_lines(src, "cpdef Py_ssize_t broadcast",
                                                          "for i in range")),
               ("Hub.flush, per connection write", loop_lines(src, "cpdef flush(self)",
                                                              "for i in range")),
               ("Conn._append, per delivery", loop_lines(src, "cdef int _append(", None))]
    bad = 0
    for title, lines in regions:
        print(f"{title}:")
        for n in lines:
            text = src[n - 1].rstrip()
            score = scores.get(n, 0)
            allowed = any(a in text for a in ALLOWED) or "raise MemoryError" in text
            flag = "" if score == 0 else ("  (allowed)" if allowed else "  <-- Python API")
            if score and not allowed:
                bad += 1
            print(f"  {n:4d} score {score:2d}  {text.strip()}{flag}")
    print("OK: no Python API call per delivery" if not bad else
          f"{bad} per-delivery line(s) call into Python")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
