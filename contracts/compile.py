"""Regenerate fastws/indexer/PredictionMarket.json from contracts/PredictionMarket.vy.

A developer tool, not a runtime dependency: ``pip install "vyper==0.4.3"`` then
``python contracts/compile.py``.  Compiling needs no network.  The artifact records
the compiler version, the EVM version and the source's SHA-256, and
tests/test_indexer_mapping.py checks that it still matches the source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "contracts" / "PredictionMarket.vy"
ARTIFACT = ROOT / "fastws" / "indexer" / "PredictionMarket.json"
EVM_VERSION = "cancun"


def main() -> None:
    """Compile the source and write the artifact (ABI, bytecode, provenance)."""
    import vyper
    from vyper.compiler.settings import Settings

    src = SOURCE.read_text()
    out = vyper.compile_code(src, output_formats=["abi", "bytecode"],
                             settings=Settings(evm_version=EVM_VERSION))
    artifact = {
        "contractName": "PredictionMarket",
        "source": "contracts/PredictionMarket.vy",
        "sourceSha256": hashlib.sha256(src.encode()).hexdigest(),
        "compiler": f"vyper {vyper.__version__}",
        "evmVersion": EVM_VERSION,
        "abi": out["abi"],
        "bytecode": out["bytecode"],
    }
    ARTIFACT.write_text(json.dumps(artifact, indent=1) + "\n")
    print(f"wrote {ARTIFACT.relative_to(ROOT)} ({len(out['bytecode']) // 2 - 1} bytes of code)")


if __name__ == "__main__":
    main()
