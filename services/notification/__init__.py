"""The notification service: channels and buyers hear about every outcome, reliably.

Webhooks (HMAC-signed, retried from a durable due-time table, isolated per endpoint) and email
(SMTP, Indonesian and English templates). Entry point: ``service.py``; receiver docs:
``docs/webhooks.md``.
"""

NAME = "notification"
