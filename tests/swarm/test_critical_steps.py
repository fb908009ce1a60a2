"""critical_steps on hand-built traces (report §3: sum over stages of S_main + max_i S_sub,i)."""

import pytest

from k25.swarm import critical_steps


def test_no_subagents_counts_main_steps():
    stages = [{"main_steps": 1, "sub_steps": []} for _ in range(7)]
    assert critical_steps(stages) == 7
    assert critical_steps([]) == 0


def test_one_wave_adds_the_slowest_subagent():
    # search, create_subagent, one wave of 4 subagents (3, 9, 5, 9 steps), final answer
    stages = [{"main_steps": 1, "sub_steps": []}, {"main_steps": 1, "sub_steps": []},
              {"main_steps": 1, "sub_steps": [3, 9, 5, 9]}, {"main_steps": 1, "sub_steps": []}]
    assert critical_steps(stages) == 1 + 1 + (1 + 9) + 1


def test_several_uneven_waves():
    stages = [{"main_steps": 1, "sub_steps": [2, 17]}, {"main_steps": 2, "sub_steps": []},
              {"main_steps": 1, "sub_steps": [40]}, {"main_steps": 1, "sub_steps": [1, 1, 1, 1, 6, 1]},
              {"main_steps": 3, "sub_steps": [0, 4]}]
    assert critical_steps(stages) == (1 + 17) + 2 + (1 + 40) + (1 + 6) + (3 + 4)
    # the total work is larger: critical steps only follow the longest branch of each wave
    total = sum(s["main_steps"] + sum(s["sub_steps"]) for s in stages)
    assert total == 82 and critical_steps(stages) == 75


@pytest.mark.parametrize("stages,field", [
    ([{"sub_steps": []}], "main_steps"),
    ([{"main_steps": 1}], "sub_steps"),
    ([{"main_steps": -1, "sub_steps": []}], "main_steps"),
    ([{"main_steps": 1, "sub_steps": [2, "x"]}], r"sub_steps'\]\[1\]"),
    ([{"main_steps": 1, "sub_steps": 3}], "sub_steps"),
    ([{"main_steps": True, "sub_steps": []}], "main_steps"),
])
def test_bad_stages_name_the_field(stages, field):
    with pytest.raises(ValueError, match=field):
        critical_steps(stages)
