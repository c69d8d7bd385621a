"""The stamping service: intake of documents, the stamping workers, reads and public verification.

Entry point: ``service.py``. The PDF and signing library it drives: ``document/`` and ``signing/``.
"""

NAME = "stamping"
