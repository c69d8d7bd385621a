"""How every service consumes: a small pipeline in the spirit of getsentry/arroyo.

    source (Kafka, or the in-memory broker of the component tests)
      -> decode (envelope + payload; undecodable batches become dead-letter markers)
      -> handler (one transaction per partition batch: inbox, effects, outbox)
      -> failure policy (``kernel/failures.py`` decides: wait, retry in place, retry durably, dead-letter)
      -> commit policy (offsets committed only after the work, per partition)

One module a concept: ``source.py`` (the contract), ``kafka_source.py`` and ``memory.py`` (two
implementations), ``handler.py`` (transactional batches and per-record handlers), ``deadletter.py``
(the record and its limit), ``pipeline.py`` (the loop that chains them).
"""
