# pragma version ~=0.4.3
"""
@title MarketFactory
@notice Deploys PredictionMarket contracts from a blueprint and logs each one with
        MarketDeployed(market, owner): the event `fastws index --follow
        MarketDeployed.market` follows, so that a market contract created at run time
        is indexed from its first block.
@dev Compile with `python contracts/compile.py`; the artifact is
     fastws/indexer/MarketFactory.json.  `blueprint` is a PredictionMarket deployed
     with its ERC-5202 blueprint bytecode.
"""

event MarketDeployed:
    market: indexed(address)
    owner: indexed(address)

BLUEPRINT: public(immutable(address))
deployedCount: public(uint256)


@deploy
def __init__(blueprint: address):
    BLUEPRINT = blueprint


@external
def deployMarket() -> address:
    """@notice A new PredictionMarket owned by the caller; returns its address."""
    market: address = create_from_blueprint(BLUEPRINT, msg.sender)
    self.deployedCount += 1
    log MarketDeployed(market=market, owner=msg.sender)
    return market
