from prometheus_client import Counter, Gauge, Histogram

STAMP_OUTCOMES = Counter("bubuh_stamp_outcomes_total", "Stamp requests by outcome and code",
                         ["outcome", "code"])
STAGE_SECONDS = Histogram("bubuh_stamp_stage_seconds", "Time spent per stage: queued (accepted to reserved), "
                          "reserved (reserved to signing), signing (the stamp itself)", ["stage"],
                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
QUEUE_DEPTH = Gauge("bubuh_stamp_queue_depth_requests", "Accepted stamp requests not yet finished")
# by channel (registered channels bound it) and status, i.e. the tier the request waits on: queued (quota),
# reserved and stamping (the stamping workers), signed (the ledger's commit); refreshed by backlog.py
OPEN_REQUESTS = Gauge("bubuh_stamp_open_requests", "Accepted stamp requests not yet finished, by channel and "
                      "status: queued (waits for quota), reserved / stamping (the stamping workers), signed "
                      "(waits for the ledger's commit)", ["channel", "status"])
OLDEST_OPEN_SECONDS = Gauge("bubuh_stamp_oldest_open_request_age_seconds",
                            "Age of the oldest accepted, unfinished stamp request, by channel and status",
                            ["channel", "status"])
CHANNEL_COMPLETED = Counter("bubuh_stamp_channel_completed_total", "Stamp requests completed, by channel "
                            "(each channel's share of stamping)", ["channel"])
SIGNING_CERT_REVOKED = Gauge("bubuh_signing_certificate_revoked",
                             "1 while this worker's signing certificate is reported revoked (it stamps nothing), "
                             "else 0")
# the 202's path, stage by stage (http_intake.StampIntake.accept): where a surge's intake latency goes
INTAKE_STAGE_SECONDS = Histogram("bubuh_stamp_intake_stage_seconds", "Time of one stage of a stamp intake: "
                                 "inspect (the sandboxed check, waiting for a child included), store (document "
                                 "and request on disk), record (the queued row, written while the store's files "
                                 "are fsynced: its wait beyond the store), publish (Kafka's acknowledgement), "
                                 "position (queue position and ETA)", ["stage"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
INTAKE_REJECTED = Counter("bubuh_stamp_intake_rejected_total", "Uploads refused at intake, by code", ["code"])
SANDBOX_OUTCOMES = Counter("bubuh_document_sandbox_tasks_total",
                           "Document work in the sandboxed children (intake, signing, verification), by outcome: "
                           "ok, refused (a coded answer), cpu / memory (over budget), timeout, crashed, "
                           "stopped (by a stop signal, not the document: retryable), busy, error",
                           ["sandbox", "outcome"])
SANDBOX_SECONDS = Histogram("bubuh_document_sandbox_task_seconds", "Elapsed time of one sandboxed task",
                            ["sandbox"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
THROUGHPUT_RESTARTS = Counter("bubuh_throughput_app_restarts_total", "faust throughput apps (the ETAs' rates) "
                              "started anew after the one running crashed or stopped by itself")
DOOR_COST = Gauge("bubuh_stamp_pace_door_cost_ratio",
                  "Stamps/s the stamping tier signs fewer per stamp request/s the door takes, fitted over the "
                  "last 10 minutes' backlogged seconds (0: the door does not take the tier's cores); ETAs count it")
