"""Regenerate the committed artifacts in fastws/indexer/ from the sources in contracts/.

``PredictionMarket.vy`` → ``PredictionMarket.json`` (ABI, bytecode and the ERC-5202
blueprint bytecode that ``MarketFactory`` deploys from), ``MarketFactory.vy`` →
``MarketFactory.json``.  A developer tool, not a runtime dependency:
``pip install "vyper==0.4.3"`` then ``python contracts/compile.py``.  Compiling needs
no network.  Each artifact records the compiler version, the EVM version and the
source's SHA-256, and tests/test_indexer_mapping.py checks that it still matches the
source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ("PredictionMarket", "MarketFactory")
EVM_VERSION = "cancun"


def build(name: str) -> Path:
    """Compile ``contracts/<name>.vy`` and write ``fastws/indexer/<name>.json``."""
    import vyper
    from vyper.compiler.settings import Settings

    source = ROOT / "contracts" / f"{name}.vy"
    artifact_path = ROOT / "fastws" / "indexer" / f"{name}.json"
    src = source.read_text()
    out = vyper.compile_code(src, output_formats=["abi", "bytecode", "blueprint_bytecode"],
                             settings=Settings(evm_version=EVM_VERSION))
    artifact = {
        "contractName": name,
        "source": f"contracts/{name}.vy",
        "sourceSha256": hashlib.sha256(src.encode()).hexdigest(),
        "compiler": f"vyper {vyper.__version__}",
        "evmVersion": EVM_VERSION,
        "abi": out["abi"],
        "bytecode": out["bytecode"],
        "blueprintBytecode": out["blueprint_bytecode"],
    }
    artifact_path.write_text(json.dumps(artifact, indent=1) + "\n")
    print(f"wrote {artifact_path.relative_to(ROOT)} "
          f"({len(out['bytecode']) // 2 - 1} bytes of code)")
    return artifact_path


def main() -> None:
    """Compile every contract of :data:`CONTRACTS`."""
    for name in CONTRACTS:
        build(name)


if __name__ == "__main__":
    main()
