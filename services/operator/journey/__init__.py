"""``bubuh trace``: the journey of one stamp request or purchase across the services.

Read from what the platform keeps, never from logs: the records on Kafka (found by key), the
inbox rows where each event was applied (with the topic, partition and offset it was read at),
the ledger's transfers, the stamping and purchase rows, the notification deliveries, and the
dead-letter topics.
"""
