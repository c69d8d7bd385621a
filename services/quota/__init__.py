"""The quota service: the ledger of stamp units per account, two-phase like TigerBeetle's transfers.

Entry point: ``service.py``; the ledger itself: ``ledger.py``.
"""

NAME = "quota"
