"""Static pipeline schedules (k25/parallel/schedule.py): bubble, memory bound, and that the slot tables deliver
every value to the unit that needs it (replayed symbolically, the way the executor reads them)."""

import numpy as np
import pytest

from k25.parallel import schedule as S

GRID = [(p, v, m) for p in (1, 2, 3, 4) for v in (1, 2, 3) for m in (1, 2, 3, 4, 8) if v == 1 or m % p == 0]


def replay(s: S.Schedule) -> None:
    """Run the tables on symbols: a unit's output is the token of the unit; check every read sees the token
    of its producer, every backward reads its own forward's residuals, and every unit runs exactly once."""
    p, v, m = s.stages, s.virtual, s.microbatches
    xbuf = [[None] * max(s.x_slots, 1) for _ in range(p)]
    gbuf = [[None] * max(s.g_slots, 1) for _ in range(p)]
    res = [[None] * max(s.res_slots, 1) for _ in range(p)]
    ran = []
    for t in range(s.ticks):
        send_f, send_b = [None] * p, [None] * p
        for st in range(p):
            op, r, i, xs, rs, gs, _, _ = s.table[t, st]
            if op in (S.FWD, S.FWD_HEAD):
                want = ("in", i) if (st == 0 and r == 0) else (("F", r, st - 1, i) if st else ("F", r - 1, p - 1, i))
                got = ("in", i) if xs < 0 else xbuf[st][xs]
                assert got == want, (t, st, got, want)
                if s.kind == "1f1b":
                    res[st][rs] = ("F", r, st, i)
                if op == S.FWD_HEAD:
                    assert (r, st) == (v - 1, p - 1)
                    if s.kind == "1f1b":
                        gbuf[st][gs] = ("head", i)
                else:
                    send_f[st] = ("F", r, st, i)
            elif op == S.BWD:
                want = ("head", i) if (r, st) == (v - 1, p - 1) else (
                    ("B", r, st + 1, i) if st < p - 1 else ("B", r + 1, 0, i))
                assert gbuf[st][gs] == want, (t, st, gbuf[st][gs], want)
                assert res[st][rs] == ("F", r, st, i)
                if (r, st) != (0, 0):
                    send_b[st] = ("B", r, st, i)
            if op != S.IDLE:
                ran.append((op == S.BWD, r, st, i))
        for st in range(p):
            rx, rg = s.table[t, st, S.RECV_X], s.table[t, st, S.RECV_G]
            if rx >= 0:
                assert send_f[(st - 1) % p] is not None
                xbuf[st][rx] = send_f[(st - 1) % p]
            if rg >= 0:
                assert send_b[(st + 1) % p] is not None
                gbuf[st][rg] = send_b[(st + 1) % p]
    kinds = (False, True) if s.kind == "1f1b" else (False,)
    expected = {(b, r, st, i) for b in kinds for r in range(v) for st in range(p) for i in range(m)}
    assert sorted(ran) == sorted(expected)


@pytest.mark.parametrize("p,v,m", GRID)
def test_schedules_deliver_and_reach_the_theoretical_bubble(p, v, m):
    for kind in S.SCHEDULES:
        s = S.build(kind, p, v, m)
        replay(s)
        assert s.bubble_fraction() == pytest.approx(S.bubble_theory(p, v, m), abs=1e-12), kind
    gpipe, onef = S.build("gpipe", p, v, m), S.build("1f1b", p, v, m)
    assert gpipe.ticks == m * v + p - 1
    assert onef.ticks == 2 * (m * v + p - 1)
    assert onef.res_slots <= min(m * v, (p - 1) + (v - 1) * p + 1)  # bounded by depth, not by m


def test_1f1b_residuals_do_not_grow_with_microbatches():
    slots = [S.build("1f1b", 4, 1, m).res_slots for m in (4, 8, 16, 32)]
    assert slots == [4, 4, 4, 4]
    assert [S.build("1f1b", 4, 2, m).res_slots for m in (8, 16, 32)] == [8, 8, 8]


def test_bench_shape_bubble():
    s = S.build("1f1b", 4, 2, 8)
    assert s.bubble_theory() == pytest.approx(3 / 19)
    assert s.bubble_fraction() - s.bubble_theory() <= 0.05


@pytest.mark.parametrize("args,pattern", [
    (("pipedream", 2, 1, 2), r"schedule='pipedream'"),
    (("1f1b", 2, 2, 3), r"microbatches=3 must be a multiple of config\.mesh\.pp=2"),
    (("gpipe", 2, 0, 2), r"virtual_stages=0"),
    (("gpipe", 2, 1, 0), r"microbatches=0"),
])
def test_invalid_settings_name_the_field(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        S.build(*args)


def test_table_is_int32_and_ops_are_known():
    s = S.build("1f1b", 3, 2, 6)
    assert s.table.dtype == np.int32 and s.table.shape == (s.ticks, 3, len(S.COLUMNS))
    assert set(np.unique(s.table[:, :, S.OP])) <= {S.IDLE, S.FWD, S.FWD_HEAD, S.BWD}
