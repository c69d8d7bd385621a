from prometheus_client import Counter

PURCHASES = Counter("bubuh_purchases_total",
                    "Purchases by outcome: accepted/replayed/mismatch/invalid at intake; confirmed/duplicate/"
                    "rejected when recorded", ["outcome"])
