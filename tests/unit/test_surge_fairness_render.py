"""``loadtests/surge.py --fairness --render-only`` rewrites the README's fairness table from ``--out`` and
measures nothing: until 5 December it ran a fairness round against whatever platform was up (into a
benchmark running beside it) and overwrote the result it was asked to render."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from loadtests import surge

ROUND = {"alone": {"p99_s": 0.41},
         "mixed": [{"p50_s": 6.9, "p99_s": 9.8}, {"p99_s": 0.93}, {"p99_s": 0.81}],
         "ratios": [2.27, 1.98], "stamps_per_s_end_to_end": 43.8}
RESULT = {"compares": "fairness", "generated_at": "2026-12-05T21:18:06+00:00",
          "flood": {"stamps": 1600, "in_flight": 32},
          "small": {"stamps": 200, "in_flight": 2, "channels": 2, "held_until_ended": True},
          "flood_share": 0.8, "rounds": [ROUND], "median_worst_ratio": 2.27, "target": 2.0,
          "meets_target": False}


def test_render_only_writes_the_table_from_the_saved_result_and_touches_no_platform(tmp_path: Path, monkeypatch):
    out, readme = tmp_path / "surge-fairness.json", tmp_path / "README.md"
    out.write_text(json.dumps(RESULT))
    readme.write_text(f"intro\n{surge.README_FAIR_BEGIN}\nold table\n{surge.README_FAIR_END}\nafter\n")

    def no_network(*args, **kwargs):
        raise AssertionError("render-only opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    rc = surge.main(["--fairness", "--render-only", "--base-url", "http://127.0.0.1:9",
                     "--out", str(out), "--readme", str(readme)])
    assert rc == 1                                       # the saved verdict: not met
    text = readme.read_text()
    assert "old table" not in text and "| 1 | 0.41 | 0.93 (x2.27), 0.81 (x1.98) | 6.9 / 9.8 | 43.8 |" in text
    assert "**x2.27**" in text and text.startswith("intro\n") and text.endswith("after\n")
    assert json.loads(out.read_text())["generated_at"] == RESULT["generated_at"]     # the result kept as it was

