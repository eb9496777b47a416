# pragma version ~=0.4.3
"""
@title PredictionMarket
@notice Binary (YES/NO) prediction markets: anyone creates a market and bets wei on
        an outcome; the owner resolves it. The contract behind `fastws serve --demo`,
        deployed at run time by MarketFactory (contracts/MarketFactory.vy).
@dev Compile with `python contracts/compile.py` (vyper 0.4.x, offline); the ABI,
     bytecode and blueprint bytecode are committed in
     fastws/indexer/PredictionMarket.json.
"""

event MarketCreated:
    marketId: indexed(uint256)
    creator: indexed(address)
    question: String[200]
    endTime: uint256

event BetPlaced:
    marketId: indexed(uint256)
    bettor: indexed(address)
    outcome: bool
    amount: uint256
    yesPool: uint256
    noPool: uint256

event MarketResolved:
    marketId: indexed(uint256)
    outcome: bool
    totalPool: uint256

struct Market:
    question: String[200]
    endTime: uint256
    yesPool: uint256
    noPool: uint256
    resolved: bool
    outcome: bool

owner: public(address)
marketCount: public(uint256)
markets: public(HashMap[uint256, Market])


@deploy
def __init__(owner: address):
    """@notice `owner` resolves the markets (the factory passes its caller)."""
    self.owner = owner


@external
def createMarket(question: String[200], endTime: uint256) -> uint256:
    """@notice Open a market that takes bets until `endTime` (unix seconds)."""
    assert endTime > block.timestamp, "endTime must be in the future"
    marketId: uint256 = self.marketCount
    self.markets[marketId] = Market(
        question=question, endTime=endTime, yesPool=0, noPool=0, resolved=False, outcome=False
    )
    self.marketCount = marketId + 1
    log MarketCreated(marketId=marketId, creator=msg.sender, question=question, endTime=endTime)
    return marketId


@external
@payable
def placeBet(marketId: uint256, outcome: bool):
    """@notice Bet msg.value wei on `outcome` (true = YES) of an open market."""
    assert marketId < self.marketCount, "no such market"
    assert msg.value > 0, "bet some wei"
    m: Market = self.markets[marketId]
    assert not m.resolved, "market resolved"
    assert block.timestamp < m.endTime, "market closed"
    if outcome:
        m.yesPool += msg.value
    else:
        m.noPool += msg.value
    self.markets[marketId] = m
    log BetPlaced(marketId=marketId, bettor=msg.sender, outcome=outcome, amount=msg.value,
                  yesPool=m.yesPool, noPool=m.noPool)


@external
def resolveMarket(marketId: uint256, outcome: bool):
    """@notice The owner settles a market on `outcome`; it takes no more bets."""
    assert msg.sender == self.owner, "only the owner resolves"
    assert marketId < self.marketCount, "no such market"
    m: Market = self.markets[marketId]
    assert not m.resolved, "already resolved"
    m.resolved = True
    m.outcome = outcome
    self.markets[marketId] = m
    log MarketResolved(marketId=marketId, outcome=outcome, totalPool=m.yesPool + m.noPool)
