"""The typed round record: its JSON line (what ``metrics.jsonl`` holds) and back."""

from __future__ import annotations

import json

from strategies.fedmoe_da import FedMoEDARoundRecord
from strategies.fltac import FLTACRoundRecord
from strategies.round_record import RoundRecord


def test_fields_left_unset_are_absent_from_the_line_and_extra_is_merged_in() -> None:
    record = RoundRecord(round=3, replies_ok=2, aggregated=False, extra={"my_metric": 1.5})
    assert record.to_json() == {
        "round": 3,
        "replies_ok": 2,
        "aggregated": False,
        "my_metric": 1.5,
    }


def test_a_line_reads_back_to_the_same_record_and_unknown_keys_land_in_extra() -> None:
    record = FLTACRoundRecord(
        round=2,
        replies_ok=10,
        groups={"g0": 4, "g1": 6},
        clustering_agreement=1.0,
        mean_accuracy=0.75,
        bytes={"train_up": 100, "cumulative": {"train_up": 300}},
    )
    line = json.loads(json.dumps(record.to_json()))
    assert FLTACRoundRecord.from_json(line) == record
    older = FLTACRoundRecord.from_json({**line, "renamed_later": [1, 2]})
    assert older.extra == {"renamed_later": [1, 2]} and older.groups == {"g0": 4, "g1": 6}


def test_each_method_reads_its_own_entries_and_keeps_the_others_in_extra() -> None:
    line = {"round": 1, "peer_fetches": 7, "clustering_agreement": 0.5}
    moe = FedMoEDARoundRecord.from_json(line)
    assert moe.peer_fetches == 7 and moe.extra == {"clustering_agreement": 0.5}
    fltac = FLTACRoundRecord.from_json(line)
    assert fltac.clustering_agreement == 0.5 and fltac.extra == {"peer_fetches": 7}
    assert moe.to_json() == fltac.to_json() == line  # the same line either way
