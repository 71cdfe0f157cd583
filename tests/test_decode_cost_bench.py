"""`python -m bench.decode_cost` runs and reports every row (speeds are never asserted)."""

from __future__ import annotations

import json

from bench import decode_cost


def test_decode_cost_reports_old_and_new_codec_and_both_framings(capsys):
    decode_cost.main(["--rounds", "1", "--socket-messages", "20"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["decode"]) == set(report["encode"]) >= {"SEND", "RECEIPT", "DELIVER"}
    for row in report["decode"].values():
        assert row["old_us"] > 0 and row["new_v3_us"] > 0 and row["new_v2_us"] > 0
    assert set(report["socket"]) == {"one_frame", "three_frames"}
    assert report["build"]["dataclass_us"] > 0 and report["build"]["struct_us"] > 0
