"""Build script: compiles every fastws/*.pyx into a C extension at build time.

There is no pure-Python fallback: if Cython or a C compiler is missing the build
fails here, and ``import fastws`` fails loudly if the extension is absent.
"""

import os
from pathlib import Path

import picows
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
PICOWS_DIR = os.path.dirname(os.path.dirname(picows.__file__))

extensions = [
    Extension(
        f"fastws.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        extra_compile_args=["-O2"],
        libraries=["z"] if pyx.stem == "_fanout" else [],   # permessage-deflate (zlib)
    )
    for pyx in sorted((HERE / "fastws").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=[PICOWS_DIR, str(HERE)],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
        annotate=bool(os.environ.get("FASTWS_ANNOTATE")),
    ),
)
