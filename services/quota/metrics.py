from prometheus_client import Counter, Histogram

LEDGER_OPERATIONS = Counter("bubuh_ledger_operations_total", "Ledger operations by outcome",
                            ["operation", "outcome"])
LEDGER_SECONDS = Histogram("bubuh_ledger_operation_seconds", "Time of one ledger transaction", ["operation"],
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
