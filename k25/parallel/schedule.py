"""Static pipeline schedules: which stage runs which forward/backward unit at every tick, and where data waits.

The layer stack is cut into p*v *chunks*; chunk j = r*p + s (repeat r < v, stage s < p) lives on pipeline
stage s, so each stage holds v chunks spread around the stack (the circular / interleaved layout). A *unit*
is one chunk applied to one microbatch, forward (F) or backward (B). All stages advance in lockstep ticks;
per tick a stage runs at most one unit, and what it produced reaches its neighbour for the next tick.

  * `gpipe`: every stage runs its m*v forward units back to back (microbatches in groups of p, each group
    through chunk r on every stage before chunk r+1); the backward is left to autodiff, which replays the
    forward ticks in reverse. Ticks: m*v + p - 1.
  * `1f1b`: Megatron's interleaved one-forward-one-backward order. Stage s first runs
    w_s = (p - s - 1) + (v - 1)*p forward units, then alternates one forward and one backward, then drains
    its backwards. Backward units visit the chunks in reverse. A stage never holds more than w_s + 1
    forward units awaiting their backward, so live activations are bounded by the pipeline depth, not m.
    (Megatron warms up with 2*(p - s - 1) + (v - 1)*p because its backward takes twice a forward; with the
    unit-time ticks here the smaller warm-up reaches the same length with less memory.) Ticks:
    2*(m*v + p - 1), so the bubble is (p - 1)/(m*v + p - 1), the interleaved schedule's theoretical bubble;
    `tests/parallel/test_schedule.py` checks this over a grid of (p, v, m).

The tick order is found by simulation (a unit runs at the first tick its input has arrived, in the stage's
order), then every value that has to wait is given a slot in a small per-stage buffer by interval
colouring: inputs waiting for a forward (`x`), output cotangents waiting for a backward (`g`), and saved
forward residuals waiting for their backward (`res`). The executor (k25/parallel/pipeline.py) only reads
these tables; nothing about the order is decided while tracing.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

SCHEDULES = ("gpipe", "1f1b")

IDLE, FWD, FWD_HEAD, BWD = 0, 1, 2, 3  # op codes; FWD_HEAD: the last chunk's forward, followed by the loss head

# table columns
OP, CHUNK, MICRO, X_SLOT, RES_SLOT, G_SLOT, RECV_X, RECV_G = range(8)
COLUMNS = ("op", "chunk", "micro", "x_slot", "res_slot", "g_slot", "recv_x", "recv_g")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-tick, per-stage instructions, `table[t, s, column]` (int32, -1 = none).

    op        IDLE / FWD / FWD_HEAD / BWD
    chunk     repeat r of the unit (the stage's r-th chunk)
    micro     microbatch of the unit
    x_slot    F: x-buffer slot holding the input; -1: read the microbatch from the pipeline input
    res_slot  F: slot the residuals are saved to; B: slot they are read from (1f1b only)
    g_slot    B: g-buffer slot holding the output cotangent; FWD_HEAD: slot the loss cotangent goes to
    recv_x    x-buffer slot for what the previous stage sends at the end of this tick (-1: drop it)
    recv_g    g-buffer slot for what the next stage sends back at the end of this tick (-1: drop it)
    """

    kind: str
    stages: int
    virtual: int
    microbatches: int
    table: np.ndarray  # (ticks, stages, len(COLUMNS)) int32
    x_slots: int
    g_slots: int
    res_slots: int

    @property
    def ticks(self) -> int:
        return self.table.shape[0]

    def bubble_fraction(self) -> float:
        """Idle (tick, stage) pairs over all pairs; gpipe's autodiff backward mirrors its forward."""
        return float(np.mean(self.table[:, :, OP] == IDLE))

    def bubble_theory(self) -> float:
        return bubble_theory(self.stages, self.virtual, self.microbatches)


def bubble_theory(p: int, v: int, m: int) -> float:
    """(p - 1) / (v*m + p - 1): the interleaved pipeline's idle share with equal forward and backward ticks."""
    return (p - 1) / (v * m + p - 1)


def validate(kind: str, p: int, v: int, m: int) -> None:
    """ValueError naming the config field and the fix."""
    if kind not in SCHEDULES:
        raise ValueError(f"config.pipeline.schedule={kind!r} is unknown; choose one of {list(SCHEDULES)}.")
    if v < 1:
        raise ValueError(f"config.pipeline.virtual_stages={v} must be >= 1 (1 = no interleaving).")
    if m < 1:
        raise ValueError(f"config.pipeline.microbatches={m} must be >= 1.")
    if p < 1:
        raise ValueError(f"config.mesh.pp={p} must be >= 1.")
    if v > 1 and m % p:
        raise ValueError(f"config.pipeline.microbatches={m} must be a multiple of config.mesh.pp={p} when "
                         f"config.pipeline.virtual_stages={v} > 1: the interleaved schedule sends microbatches "
                         f"through the stages in groups of pp; use microbatches={max(p, m - m % p)}.")


def _unit_order(p: int, v: int, m: int, backward: bool) -> list[tuple[int, int]]:
    """(chunk r, microbatch i) of a stage's k-th forward (or backward) unit: groups of p microbatches."""
    out = []
    for k in range(m * v):
        r = (k // p) % v
        i = (k // (p * v)) * p + k % p if v > 1 else k
        out.append((v - 1 - r if backward else r, i))
    return out


def _stage_orders(kind: str, p: int, v: int, m: int) -> list[list[tuple[str, int, int]]]:
    fwd = [("F", r, i) for r, i in _unit_order(p, v, m, False)]
    if kind == "gpipe":
        return [list(fwd) for _ in range(p)]
    bwd = [("B", r, i) for r, i in _unit_order(p, v, m, True)]
    orders = []
    for s in range(p):
        w = min((p - s - 1) + (v - 1) * p, len(fwd))
        ops = fwd[:w]
        f = w
        for b in bwd:
            if f < len(fwd):
                ops.append(fwd[f])
                f += 1
            ops.append(b)
        orders.append(ops)
    return orders


def _dependency(op: tuple[str, int, int], s: int, p: int, v: int) -> tuple[str, int, int, int] | None:
    """The unit (kind, r, stage, i) whose output this unit consumes; None for a first-chunk forward."""
    kind, r, i = op
    if kind == "F":
        if s > 0:
            return ("F", r, s - 1, i)
        return ("F", r - 1, p - 1, i) if r > 0 else None
    if s < p - 1:
        return ("B", r, s + 1, i)
    return ("B", r + 1, 0, i) if r < v - 1 else ("F", r, s, i)  # the last chunk's backward follows its head


def _simulate(orders: list[list[tuple[str, int, int]]], p: int, v: int) -> list[list[tuple[str, int, int] | None]]:
    """Lockstep ticks: each stage runs its next unit once its input was produced at an earlier tick."""
    done: dict[tuple[str, int, int, int], int] = {}
    ptr = [0] * p
    grid: list[list[tuple[str, int, int] | None]] = []
    limit = 4 * sum(len(o) for o in orders) + 4 * p
    while any(ptr[s] < len(orders[s]) for s in range(p)):
        row: list[tuple[str, int, int] | None] = []
        for s in range(p):
            op = orders[s][ptr[s]] if ptr[s] < len(orders[s]) else None
            dep = _dependency(op, s, p, v) if op is not None else None
            row.append(op if op is not None and (dep is None or done.get(dep, len(grid)) < len(grid)) else None)
        for s, op in enumerate(row):
            if op is not None:
                done[(op[0], op[1], s, op[2])] = len(grid)
                ptr[s] += 1
        grid.append(row)
        if len(grid) > limit:
            raise RuntimeError(f"pipeline schedule deadlocked (p={p}, v={v}); this is a bug in the unit order.")
    return grid


def _colour(intervals: list[tuple[int, int, tuple]]) -> tuple[dict[tuple, int], int]:
    """Slots for values alive over inclusive tick intervals [a, b]; values sharing a slot never overlap."""
    free_at: list[int] = []  # per slot: first tick it is free again
    slot_of: dict[tuple, int] = {}
    for a, b, key in sorted(intervals):
        for k, t in enumerate(free_at):
            if t <= a:
                free_at[k] = b + 1
                slot_of[key] = k
                break
        else:
            slot_of[key] = len(free_at)
            free_at.append(b + 1)
    return slot_of, len(free_at)


def build(kind: str, p: int, v: int, m: int) -> Schedule:
    """The static schedule for p stages, v chunks per stage, m microbatches."""
    validate(kind, p, v, m)
    grid = _simulate(_stage_orders(kind, p, v, m), p, v)
    when = {(op[0], op[1], s, op[2]): t for t, row in enumerate(grid) for s, op in enumerate(row) if op is not None}
    table = np.full((len(grid), p, len(COLUMNS)), -1, np.int32)
    table[:, :, OP] = IDLE
    xs, gs, res = defaultdict(list), defaultdict(list), defaultdict(list)  # per stage: (a, b, key)
    for (kind_, r, s, i), t in when.items():
        last = r == v - 1 and s == p - 1
        table[t, s, OP] = BWD if kind_ == "B" else (FWD_HEAD if last else FWD)
        table[t, s, CHUNK], table[t, s, MICRO] = r, i
        dep = _dependency((kind_, r, i), s, p, v)
        if kind_ == "F":
            if dep is not None:  # sent by the producer at the end of tick when[dep], read at tick t
                xs[s].append((when[dep] + 1, t, (r, i)))
            if ("B", r, s, i) in when:
                res[s].append((t, when[("B", r, s, i)], (r, i)))
        elif dep[0] == "F":  # the loss head's cotangent, written during the head tick
            gs[s].append((when[dep], t, (r, i)))
        else:
            gs[s].append((when[dep] + 1, t, (r, i)))
    x_slots = g_slots = res_slots = 0
    for s in range(p):
        xslot, nx = _colour(xs[s])
        gslot, ng = _colour(gs[s])
        rslot, nr = _colour(res[s])
        x_slots, g_slots, res_slots = max(x_slots, nx), max(g_slots, ng), max(res_slots, nr)
        for (r, i), k in xslot.items():
            t = when[("F", r, s, i)]
            table[t, s, X_SLOT] = k
            src = _dependency(("F", r, i), s, p, v)
            table[when[src], s, RECV_X] = k
        for (r, i), k in gslot.items():
            t = when[("B", r, s, i)]
            table[t, s, G_SLOT] = k
            src = _dependency(("B", r, i), s, p, v)
            if src[0] == "F":
                table[when[src], s, G_SLOT] = k
            else:
                table[when[src], s, RECV_G] = k
        for (r, i), k in rslot.items():
            table[when[("F", r, s, i)], s, RES_SLOT] = k
            table[when[("B", r, s, i)], s, RES_SLOT] = k
    return Schedule(kind, p, v, m, table, x_slots, g_slots, res_slots)
