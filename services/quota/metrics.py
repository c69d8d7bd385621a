from prometheus_client import Counter, Gauge, Histogram

LEDGER_OPERATIONS = Counter("bubuh_ledger_operations_total", "Ledger operations by outcome",
                            ["operation", "outcome"])
LEDGER_SECONDS = Histogram("bubuh_ledger_operation_seconds", "Time of one ledger transaction", ["operation"],
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
STALE_READS = Counter("bubuh_ledger_stale_reads_total", "Ledger batches whose accounts changed between their "
                      "unlocked read and their lock, so worked out again under the lock (another member's "
                      "batch on the same accounts)")
LEDGER_BATCHES = Counter("bubuh_ledger_batches_total", "Consumer batches the ledger applied, by way: at_once (one "
                         "autocommitted statement, no lock held across a round trip) or transaction (accounts "
                         "changed under every attempt, or an event claimed meanwhile)",
                         ["way"])
PENDING_UNITS = Gauge("bubuh_ledger_pending_units", "Units reserved and neither posted nor voided yet "
                      "(open reservations); refreshed by reservations.py")


for _way in ("at_once", "transaction"):
    LEDGER_BATCHES.labels(_way)

# refusals are what an operator watches: their series exist (at 0) before the first one happens
for _operation in ("reserve", "commit", "release", "expire"):
    LEDGER_OPERATIONS.labels(_operation, "refused")
