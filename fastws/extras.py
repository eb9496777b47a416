"""Optional dependencies: what ``pip install fastws`` leaves out, and one clear error.

The server needs only the core dependencies.  Ethereum features need the ``chain`` extra
(``pip install 'fastws[chain]'``: web3 with eth-tester, eth-account, coincurve):
``fastws index``, ``serve --demo``, Sign-In with Ethereum (``/auth/siwe``) and its
EIP-1271 checks (``siwe_rpc_url``).  Those code paths import their libraries lazily and
call :func:`require_chain` first, so that a core install fails with one line naming the
extra, not with a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib.util

__all__ = ["CHAIN_MODULES", "MissingExtra", "missing_chain", "require_chain"]

#: the importable modules the ``chain`` extra provides (web3 brings eth_abi, eth_utils,
#: websockets; web3[tester] brings eth_tester and py-evm)
CHAIN_MODULES = ("web3", "eth_abi", "eth_utils", "eth_account", "eth_tester", "websockets")


class MissingExtra(ImportError):
    """A feature was used whose optional dependencies are not installed.

    ``str(exc)`` is one line: what needs it, what is missing, and the pip command.
    """

    def __init__(self, feature: str, missing: tuple[str, ...], extra: str = "chain") -> None:
        self.feature = feature
        self.missing = missing
        self.extra = extra
        #: the message without the feature's name, for a caller that prints it already
        self.hint = (f"needs the '{extra}' extra ({', '.join(missing)} not installed): "
                     f"pip install 'fastws[{extra}]'")
        super().__init__(f"{feature} {self.hint}")


def missing_chain(modules: tuple[str, ...] = CHAIN_MODULES) -> tuple[str, ...]:
    """The modules of ``modules`` that cannot be imported here (none: an empty tuple)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return tuple(out)


def require_chain(feature: str, modules: tuple[str, ...] = CHAIN_MODULES) -> None:
    """Raise :class:`MissingExtra` when any of ``modules`` is missing; call it before
    importing them for ``feature`` (e.g. ``"fastws index"``, ``"serve --demo"``)."""
    missing = missing_chain(modules)
    if missing:
        raise MissingExtra(feature, missing)
