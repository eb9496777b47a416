"""EIP-1271 contract-wallet signatures, checked through a JSON-RPC node.

:class:`ContractWallets` is used by ``POST /auth/siwe`` when ``siwe_rpc_url`` is
set; its RPC calls are the only socket I/O of :mod:`fastws.auth` (asynchronous,
with a deadline).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastws.auth.siwe import SiweError

__all__ = ["ContractWallets"]

log = logging.getLogger("fastws.auth")


class ContractWallets:
    """EIP-1271 signature checks for contract wallets, through one JSON-RPC node.

    ``ContractWallets(url, timeout)``: :meth:`verify` asks the node (web3's
    ``AsyncHTTPProvider``, no retries) for its chain id (once), the address's code
    and, when it has code, ``isValidSignature(bytes32 hash, bytes signature)`` with
    the message's EIP-191 hash; the signature is valid iff the call returns the magic
    value ``0x1626ba7e``.  The calls of one check take at most ``timeout`` seconds in
    all, and never block the event loop (web3 is even imported in a thread).
    """

    MAGIC = bytes.fromhex("1626ba7e")       # bytes4(keccak256("isValidSignature(bytes32,bytes)"))
    MAX_SIGNATURE = 4096                    # bytes (multisig wallets concatenate signatures)

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self.chain_id: int | None = None    # the node's, once asked
        self._w3: Any = None

    async def _web3(self) -> Any:
        if self._w3 is None:
            import importlib

            await asyncio.to_thread(importlib.import_module, "web3")   # ~0.5 s of CPU
            import aiohttp
            from web3 import AsyncHTTPProvider, AsyncWeb3

            if self._w3 is None:
                provider = AsyncHTTPProvider(
                    self.url, exception_retry_configuration=None,
                    request_kwargs={"timeout": aiohttp.ClientTimeout(total=self.timeout)})
                self._w3 = AsyncWeb3(provider)
        return self._w3

    async def verify(self, address: str, message: str, signature: str, chain_id: int) -> bool:
        """True if the contract at ``address`` accepts ``signature`` of ``message``.

        False when the address has no code (an EOA whose key did not sign), when the
        signature is not hex, and when the contract answers anything but the magic
        value or reverts.  Raises :class:`SiweError` 401 when ``chain_id`` is not the
        node's chain (the contract there may be another one), and 503 "could not
        verify contract wallet" when the node fails or does not answer in time.
        """
        sig = signature[2:] if signature[:2] in ("0x", "0X") else signature
        if not sig or len(sig) % 2 or len(sig) > 2 * self.MAX_SIGNATURE:
            return False
        try:
            raw = bytes.fromhex(sig)
        except ValueError:
            return False
        try:
            w3 = await self._web3()         # (the first import is not the node's time)
            return await asyncio.wait_for(self._verify(w3, address, message, raw, chain_id),
                                          self.timeout)
        except SiweError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the node is a 503
            log.warning("could not verify an EIP-1271 signature of %s: %s: %s", address,
                        type(exc).__name__, self._redact(str(exc))[:300])
            raise SiweError(503, "could not verify contract wallet: the RPC node failed or "
                            "did not answer in time; get a new nonce and retry") from None

    def _redact(self, text: str) -> str:
        """``text`` without the parts of the URL that may hold an API key."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        for secret in (parts.path, parts.query, parts.username, parts.password):
            if secret and len(secret) > 1:
                text = text.replace(secret, "…")
        return text

    async def _verify(self, w3: Any, address: str, message: str, signature: bytes,
                      chain_id: int) -> bool:
        from eth_abi import encode
        from eth_utils import keccak, to_checksum_address
        from web3.exceptions import ContractLogicError

        if self.chain_id is None:
            self.chain_id = int(await w3.eth.chain_id)
        if chain_id != self.chain_id:
            raise SiweError(401, "signature does not match the message's address (contract "
                            f"wallets are verified on chain {self.chain_id} only, the message "
                            f"names chain {chain_id})")
        to = to_checksum_address(address)
        if not await w3.eth.get_code(to):
            return False
        text = message.encode()
        digest = keccak(b"\x19Ethereum Signed Message:\n" + str(len(text)).encode() + text)
        data = self.MAGIC + encode(["bytes32", "bytes"], [digest, signature])
        try:
            out = bytes(await w3.eth.call({"to": to, "data": data}))
        except ContractLogicError:       # reverted: the wallet refuses
            return False
        return out[:32] == self.MAGIC + bytes(28)

    async def close(self) -> None:
        """Close the HTTP session to the node."""
        if self._w3 is not None:
            await self._w3.provider.disconnect()
            self._w3 = None

