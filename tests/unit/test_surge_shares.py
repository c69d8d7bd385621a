"""The surge's measure of how members split a tier's work (loadtests/surge.py)."""

from __future__ import annotations

from loadtests.surge import tier_shares


def test_members_shares_are_per_tier_and_a_lone_process_is_not_judged():
    before = {"api-1": 10, "api-2": 5, "quota-1": 0, "quota-2": 0, "purchase-1": 0, "purchase-2": 0, "bubuh": 3}
    after = {"api-1": 510, "api-2": 505, "quota-1": 300, "quota-2": 100, "purchase-1": 4, "purchase-2": 0,
             "bubuh": 900}
    shares = tier_shares(before, after)
    assert set(shares) == {"api", "quota", "purchase"}        # one process is no split
    assert shares["api"] == {"work": 1000, "judged": True, "shares": [0.5, 0.5]}
    assert shares["quota"]["shares"] == [0.75, 0.25] and shares["quota"]["judged"]
    assert shares["purchase"] == {"work": 4, "judged": False, "shares": [1.0, 0.0]}   # too little to judge


def test_members_are_ordered_by_name_and_a_silent_tier_has_zero_shares():
    shares = tier_shares({}, {"stamping-2": 0, "stamping-1": 0})
    assert shares["stamping"] == {"work": 0, "judged": False, "shares": [0.0, 0.0]}
