"""Node flags: the core list a node pins itself to is parsed and checked before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.node.config import NodeConfig, parse_cores


def test_parse_cores_takes_singles_ranges_and_lists() -> None:
    assert parse_cores("0") == {0}
    assert parse_cores("0-3") == {0, 1, 2, 3}
    assert parse_cores("0,2, 4-5") == {0, 2, 4, 5}


@pytest.mark.parametrize("bad", ["", "a", "3-1", "-1", "1-x", "0,,1"])
def test_parse_cores_names_the_bad_part(bad: str) -> None:
    with pytest.raises(ValueError, match="--cores"):
        parse_cores(bad)


def test_a_node_refuses_cores_it_cannot_run_on(tmp_path: Path) -> None:
    absent = max(os.sched_getaffinity(0)) + 1
    cfg = NodeConfig(role="prefill", model=str(tmp_path), etcd="http://127.0.0.1:2379", cores=f"0,{absent}")
    with pytest.raises(ValueError, match=rf"cores \[{absent}\] are not available"):
        cfg.finish()
    ok = NodeConfig(role="prefill", model=str(tmp_path), etcd="http://127.0.0.1:2379", cores="0").finish()
    assert ok.cores == "0"


def test_core_spec_is_the_inverse_of_parse_cores() -> None:
    from tandem.node.config import core_spec

    assert core_spec([5, 0, 1, 2]) == "0-2,5"
    for spec in ("0", "0-3", "0,2,4-5", "1-2,4-7,9"):
        assert core_spec(parse_cores(spec)) == spec


def test_core_plan_never_names_cores_it_was_not_given() -> None:
    from tandem.local.cluster import core_plan

    # Every other core (e.g. one hyperthread of each pair): ranges must not fill the gaps.
    assert core_plan(1, 1, [0, 2, 4, 6]) == ["0,2", "4,6"]
    assert core_plan(1, 1, [0, 1, 2, 3]) == ["0-1", "2-3"]
