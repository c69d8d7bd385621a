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


def test_eta_accuracy_compares_the_first_eta_with_the_servers_own_times():
    from loadtests.surge import eta_accuracy

    def done(rid: str, took: float) -> dict:
        return {"request_id": rid, "status": "completed", "accepted_at": "2026-12-01T10:00:00+00:00",
                "finished_at": f"2026-12-01T10:00:{took:06.3f}+00:00"}

    first = {"a": 10.0, "b": 10.0, "c": 20.0, "d": None, "e": 10.0}
    results = [done("a", 11.0), done("b", 13.0), done("c", 16.0), done("d", 5.0),
               {"request_id": "e", "status": "failed", "accepted_at": "x"}]
    e = eta_accuracy(first, results)
    assert e["requests"] == 3                         # no ETA given, or not completed: not counted
    assert e["within_25_percent"] == round(2 / 3, 3)  # a (+10%) and c (-20%) are within; b (+30%) is not
    assert e["median_first_eta_s"] == 10.0 and e["actual_over_eta"]["median"] == 1.1
    assert eta_accuracy(first, []) == {"requests": 0}


def test_a_channels_stamps_are_split_among_its_stampers_without_a_remainder_lost():
    from loadtests.surge import split

    assert split(80, 32) == [3] * 16 + [2] * 16        # n // in_flight each sent 64 of the 80
    assert sum(split(1_600, 32)) == 1_600 and set(split(1_600, 32)) == {50}
    assert split(1, 2) == [1, 0]


def test_applicants_buy_shares_that_add_up_and_one_applicant_is_the_pooled_account():
    from loadtests.surge import applicant_accounts, applicants_words

    assert applicant_accounts(200, 1) == {"applicants": 200}          # the one row every reservation writes
    spread = applicant_accounts(200, 100)
    assert len(spread) == 100 and set(spread.values()) == {2} and sum(spread.values()) == 200
    uneven = applicant_accounts(7, 3)
    assert uneven == {"applicant-0": 3, "applicant-1": 2, "applicant-2": 2}
    assert applicant_accounts(2, 5) == {"applicant-0": 1, "applicant-1": 1}   # nobody buys nothing
    assert "one account" in applicants_words({"stamps_per_channel": 200})       # runs from before --applicants
    assert applicants_words({"stamps_per_channel": 200, "applicants_per_channel": 100}).startswith(
        "100 applicants a channel, each buying its 2 stamps")
