"""``python -m fastws ...``: the same command line as the ``fastws`` script."""

from fastws.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
