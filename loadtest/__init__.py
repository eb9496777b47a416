"""Load-test harnesses for fastws.

``loadtest.fanout`` is a precise multi-process fan-out benchmark written directly on
picows/uvloop (it never imports fastws itself); ``fastws bench`` runs it.
"""
