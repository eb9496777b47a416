# pragma version 0.4.3
# Compiled into tests/data/Wallet1271.json (for tests/test_siwe_cors_1271.py) with
#   pip install vyper==0.4.3   (a developer tool, not a dependency of fastws)
#   vyper -f combined_json --evm-version cancun contracts/Wallet1271.vy > tests/data/Wallet1271.json
"""
@title Wallet1271
@notice A minimal EIP-1271 contract wallet with one owner: a signature is valid
        when it recovers (ecrecover) to the owner. Test fixture for Sign-In with
        Ethereum by contract wallets.
"""

MAGIC_VALUE: constant(bytes4) = 0x1626ba7e
INVALID: constant(bytes4) = 0xffffffff

owner: public(address)


@deploy
def __init__(owner: address):
    self.owner = owner


@view
@external
def isValidSignature(digest: bytes32, signature: Bytes[65]) -> bytes4:
    """
    @notice EIP-1271: MAGIC_VALUE if `signature` (r ‖ s ‖ v, 65 bytes) over `digest`
            was made by the owner, else 0xffffffff.
    """
    if len(signature) != 65:
        return INVALID
    r: bytes32 = extract32(signature, 0)
    s: bytes32 = extract32(signature, 32)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    signer: address = ecrecover(digest, v, r, s)
    if signer == empty(address) or signer != self.owner:
        return INVALID
    return MAGIC_VALUE
