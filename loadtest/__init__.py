"""Load-test harnesses for fastws.

* ``loadtest.fanout``: precise multi-process fan-out benchmark on picows/uvloop (it never
  imports fastws itself; ``fastws bench`` runs it), with a compiled subscriber
  (``loadtest/_fastsub.pyx``, built on first use by ``loadtest._build``);
* ``loadtest.compare``: fastws against the anchors of ``loadtest.anchors`` (nginx+Nchan,
  Node ``ws``, python ``websockets``, a bare picows broadcaster) in one run;
* ``loadtest.memory``: server RSS per idle subscribed connection, and where it goes;
* ``loadtest.profile``: py-spy profile of the server under fan-out load;
* ``loadtest.annotate``: ``cython -a`` check of the broadcast loop;
* ``loadtest.floor``: the machine's floor, one ``send(2)`` per subscriber from plain C
  (``loadtest/floor.c``), the yardstick for the time to reach every subscriber;
* ``loadtest.broker_bench``: publications/s and the Redis hop's latency through one
  ``RedisBroker`` (no WebSocket, no HTTP);
* ``loadtest/locustfile.py``: locust scenarios (subscribers, churn, publishers);
* ``loadtest.indexer_latency``: block → client latency of ``fastws index``, polling vs
  ``newHeads``; ``loadtest.indexer_backlog``: its backlog catch-up, and publications/s
  of ``POST /api/publish`` (both need the ``chain`` extra).
* ``loadtest.docnumbers``: the figures the README, docs/benchmarks.md, docs/operations.md
  and deploy/sysctl.md quote, generated from the runs' output in docs/bench/.

docs/benchmarks.md has the numbers and the commands that produced them.
"""
