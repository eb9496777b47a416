"""Build the compiled subscriber (loadtest/_fastsub.pyx) on first use.

The extension goes to ``loadtest/build/<key>/`` (ignored by git), keyed by the source,
the Python version and the picows version, so a changed source or venv rebuilds it.
Building takes ~10 s once; later runs import the cached module.  Nothing here is
needed by fastws itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_fastsub"]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "_fastsub.pyx"


def _key() -> str:
    import picows

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{sys.version}|{picows.__version__ if hasattr(picows, '__version__') else ''}"
             f"|{picows.__file__}".encode())
    return h.hexdigest()[:16]


def load_fastsub(quiet: bool = True) -> ModuleType:
    """Import ``_fastsub``, compiling it first if no build for this source exists."""
    out = HERE / "build" / f"fastsub-{_key()}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # parallel runs build once
        found = sorted(out.glob("_fastsub*.so"))
        if not found:
            _compile(out, quiet)
            found = sorted(out.glob("_fastsub*.so"))
        if not found:
            raise ImportError(f"building {SOURCE} produced no extension in {out}")
    spec = importlib.util.spec_from_file_location("loadtest._fastsub", found[0])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile(out: Path, quiet: bool) -> None:
    import picows
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    picows_dir = os.path.dirname(os.path.dirname(picows.__file__))
    ext = Extension("_fastsub", [str(SOURCE)], extra_compile_args=["-O2"],
                    libraries=["z"])          # inflates permessage-deflate frames
    modules = cythonize([ext], include_path=[picows_dir], quiet=quiet,
                        build_dir=str(out / "c"), compiler_directives={"language_level": "3"})
    dist = Distribution({"ext_modules": modules})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = str(out)
    cmd.build_temp = str(out / "tmp")
    cmd.ensure_finalized()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(
            devnull if quiet else sys.stdout):
        cmd.run()


if __name__ == "__main__":
    m = load_fastsub(quiet=False)
    print(m.__file__)
