from prometheus_client import Counter

PURCHASES = Counter("bubuh_purchases_total",
                    "Purchases by outcome: accepted/replayed/mismatch/invalid at intake; confirmed/duplicate/"
                    "rejected when recorded", ["outcome"])

UNVERIFIED = Counter("bubuh_purchase_unverified_records_total",
                     "purchase.submitted records whose signature does not prove their sender, by the channel "
                     "they claim (`unknown` for channels not registered) and code; never reported to that channel",
                     ["claimed_channel", "code"])
