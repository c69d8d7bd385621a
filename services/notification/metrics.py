"""Prometheus metrics of the notification service (names ``bubuh_*``, units in the name)."""

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter("bubuh_webhook_deliveries_total",
                     "Webhook deliveries by final outcome: delivered, abandoned (dead after the horizon), "
                     "redelivery_requested (through the API)", ["outcome"])
ATTEMPTS = Counter("bubuh_webhook_attempts_total",
                   "Webhook HTTP attempts by result: ok, rejected (non-2xx), timeout, unreachable, "
                   "forbidden (target refused by the rules, nothing sent), no_endpoint",
                   ["result"])
ATTEMPT_SECONDS = Histogram("bubuh_webhook_attempt_seconds", "Duration of one webhook attempt",
                            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
ATTEMPTS_PER_DELIVERY = Histogram("bubuh_webhook_delivery_attempts",
                                  "Attempts a webhook delivery took until delivered or abandoned",
                                  ["outcome"], buckets=(1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50))
CIRCUIT_STATE = Gauge("bubuh_webhook_circuit_state",
                      "Circuit breaker of a webhook endpoint: 0 closed, 1 half-open, 2 open", ["endpoint"])
IN_FLIGHT = Gauge("bubuh_webhook_in_flight_requests", "Webhook requests in flight in this instance")
DUE = Gauge("bubuh_webhook_due_deliveries", "Webhook deliveries due now and not leased (the due-queue depth)")
SCHEDULED = Gauge("bubuh_webhook_scheduled_deliveries", "Webhook deliveries pending, due now or later")
# by channel: registered channels bound the label; refreshed by housekeeping.py
CHANNEL_PENDING = Gauge("bubuh_webhook_channel_pending_deliveries",
                        "Webhook deliveries pending (due now or later), by channel", ["channel"])
CHANNEL_OLDEST_SECONDS = Gauge("bubuh_webhook_channel_oldest_pending_age_seconds",
                               "Age of the oldest pending webhook delivery, by channel", ["channel"])
EMAILS = Counter("bubuh_emails_total", "Emails by outcome: sent, retry, abandoned", ["outcome"])
EMAILS_DUE = Gauge("bubuh_email_due_messages", "Emails due now and not leased (the email due-queue depth)")
NOTIFICATIONS_RECORDED = Counter("bubuh_notifications_recorded_total",
                                 "Events turned into notifications by the intake: webhook, email, "
                                 "no_webhook (channel has no URL), duplicate", ["what"])

# closed sets of label values: their series exist (at 0) before the first one happens, so a
# dashboard tells "none yet" from "not reported"
for _outcome in ("delivered", "abandoned", "redelivery_requested"):
    DELIVERIES.labels(_outcome)
for _result in ("ok", "rejected", "timeout", "unreachable", "forbidden"):
    ATTEMPTS.labels(_result)
for _outcome in ("sent", "retry", "abandoned"):
    EMAILS.labels(_outcome)
