"""The purchase service: channels, and purchases from paid to confirmed.

Consumes ``purchase.submitted`` (from channels over Kafka, and from its own HTTP intake), stores
channels and purchases in schema ``purchase``, publishes ``purchase.events`` and ``channel``.
Entry point: ``service.py``.
"""

NAME = "purchase"
