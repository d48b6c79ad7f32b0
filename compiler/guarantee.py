"""The guarantee loop of `compile` (issue 4): search a plan for a goal, build, verify and measure it
beside the dense model, and search again with a tighter or looser goal, until a plan's *measured*
speedup meets the target, and not by much more (every channel removed costs accuracy).

    round 1: goal = target x OVERSHOOT_MARGIN -> plan -> measure -> calibrate the predictor on it
    later rounds: tighten by the shortfall / relax by the overshoot, bisect once both are known
    short and stuck: measure every group at its smallest width before calling the target out of reach
    over MAX_OVERSHOOT x target at the end: measure the nearest short plan again (_settle)

Plans are measured by `timer(dense, pruned, feeds) -> (speedup, dense_ms, pruned_ms[, change])`,
the side-by-side measurement of backends/measure.py in use, a lying fake in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_prune.passes.importance import keep_top
from onnx_prune.passes.surgery import apply_plan
from onnx_prune.passes.verify import verify

MAX_ROUNDS = 6
OVERSHOOT_MARGIN = 1.04  # aim inside [target, MAX_OVERSHOOT x target], nearer its low end: a plan's
# measured speedup scatters by about 3% on this machine, and each round missed costs a measurement
SETTLE_NEAR = 1.05  # a plan measured this close below the target is measured again before one over
# MAX_OVERSHOOT x target is emitted (mobilenetv3 2x, a noisy hour: 1.92-1.97x and 2.21-2.27x in turn),
# and before the fastest plan is called short (the small DenseNet 1.5x: 1.48x, 1.43x, 1.52x in three runs)
MAX_OVERSHOOT = 1.10  # a 2x request that delivers much more wasted accuracy: search again
OVER_THE_WINDOW = "the plan chosen measured"  # how the report's note on a plan over it begins
# --search full (the mode for accuracy) tries looser goals, aimed RELAX_AIM x target, after a plan
# met the target above RELAX_TRIGGER x target: MiniLM keeps ~0.001 cosine more per 0.01x less at
# 1.5x (1.02 / 1.03 until session 27, when MiniLM's predictor came within 3.3% at worst; its 1.5x
# runs then landed at 1.51x instead of 1.52-1.53x)
RELAX_AIM = 1.01
RELAX_TRIGGER = 1.02
RELAX_ROUNDS = 2  # looser goals, each after a plan met the target above RELAX_TRIGGER x target; a looser
# goal measured short then gets one round between it and the goal met (MiniLM 1.5x, session 30: 1.57x,
# then 1.54x, then 1.48x short, and 1.54x was emitted without the round between them)


@dataclass
class Outcome:
    """What the loop chose: the plan, its prediction when first found, its measurements (speedup,
    dense_ms, pruned_ms, change), the model built from it and its verification, the rounds' records,
    and how many times the fastest plan it could find was measured short (0: not beyond reach)."""

    plan: dict
    predicted: float
    measurements: list
    pruned: object
    check: object
    rounds: list
    beyond_reach: int

    @property
    def judged(self) -> tuple:
        """The measurement the plan is judged by (the lower median of its measurements)."""
        return _lower_median(self.measurements)


class Guarantee:
    """One compile's loop state: the plans found, their measurements, and the models built."""

    def __init__(self, model, analysis, feeds, cm, find, tables, timer, target, search, steps, notes, fastest):
        """`find(goal_ms) -> plan` searches; `tables` (SPDY's, or None) are refreshed whenever `cm`, the
        cost model, is calibrated on a measurement; `fastest` is every group at its smallest width."""
        self.model, self.analysis, self.feeds, self.cm = model, analysis, feeds, cm
        self.find, self.tables, self.timer, self.target, self.search = find, tables, timer, target, search
        self.steps, self.notes, self.fastest = steps, notes, fastest
        # found: plan key -> (plan, its prediction when first found); runs: its measurements; built:
        # (pruned, check) of the plan chosen so far only (a pruned BERT-large is 0.7 GB a round)
        self.rounds, self.found, self.runs, self.built = [], {}, {}, {}
        self.timer_reports_change = False
        self.beyond_reach = 0  # measurements of the fastest plan the search finds, once the loop stops on it

    def build(self, key):
        if key not in self.built:
            plan = self.found[key][0]
            pruned = apply_plan(self.model, self.analysis, plan)
            self.built[key] = (pruned, verify(self.model, pruned, self.analysis, plan, self.feeds))
        return self.built[key]

    def _measure(self, key, last_resort) -> list:
        """Measure the plan `key` (built), again while its measurements disagree about the target."""
        pruned = self.build(key)[0]
        measured = self.runs.setdefault(key, [])
        target = self.target
        while True:
            timed = self.timer(self.model, pruned, self.feeds)
            self.timer_reports_change = len(timed) > 3  # a fake timer in tests may not
            measured.append(_measurement(timed))
            # measurements of one plan that disagree about the target get one more, so that a
            # median, not one fast (or slow) spell, decides
            speeds = [m[0] for m in measured]
            decided = len(measured) % 2 or not min(speeds) < target <= max(speeds)
            # every group at its smallest width has the last word on the target's reach: a
            # near miss (within SETTLE_NEAR) is measured three times, and the median decides
            near_miss = last_resort and len(measured) < 3 and max(speeds) < target <= max(speeds) * SETTLE_NEAR
            if decided and not near_miss:
                return measured

    def _record(self, r, goal, predicted, measured, last_resort):
        """The round's entry in the report and its progress line; returns the speedup it is judged by."""
        speedup, *_, change = measured[-1]
        judged = _lower_median(measured)[0]
        self.rounds.append({"goal": goal, "predicted_speedup": predicted, "measured_speedup": speedup})
        if last_resort:
            self.rounds[-1]["fastest_plan"] = True
        if self.timer_reports_change:
            self.rounds[-1]["speed_change_between_blocks"] = change
        if len(measured) > 1:
            self.rounds[-1]["plan_measurements"] = len(measured)
            self.rounds[-1]["plan_speedup_median"] = judged
        self.steps.note(f"round {r + 1}: " + ("the fastest plan" if last_resort else f"goal {goal:.2f}x")
                        + f", predicted {predicted:.2f}x, measured {speedup:.2f}x"
                        + (f" (median of this plan's {len(measured)} measurements: {judged:.2f}x)"
                           if len(measured) > 1 else ""))
        return judged

    def _calibrate(self, plan, speedup):
        gamma = self.cm.calibrate(plan, speedup)
        if self.tables is not None:
            self.tables.refresh(self.cm)
        return gamma

    def run(self) -> Outcome:
        target, cm = self.target, self.cm
        goal = target * OVERSHOOT_MARGIN
        short_goal = long_goal = None  # largest goal measured short, smallest goal measured enough
        relaxing = False  # looser rounds after a plan met the target well above it (--search full)
        relaxed = 0  # looser goals scheduled so far (at most RELAX_ROUNDS)
        bisected = False  # the round between a looser goal measured short and the goal met (at most one)
        last_resort = False  # this round measures the fastest plan, the search's having stayed short
        for r in range(MAX_ROUNDS + 1):
            if r == MAX_ROUNDS and not last_resort:
                break
            with self.steps(f"round {r + 1}: search, surgery, verify, measure"):
                plan = self.fastest if last_resort else self.find(cm.dense_ms / goal)
                key = _plan_key(plan)
                found_again = key in self.runs
                if relaxing and found_again:
                    break  # the looser goal found the plan already measured: nothing to gain
                predicted = cm.predicted_speedup(plan)  # the predictor changes once calibrated
                self.found.setdefault(key, (plan, predicted))
                measured = self._measure(key, last_resort)
                chosen = _chosen(self.runs, target)
                for k in [k for k in self.built if k != chosen]:
                    del self.built[k]  # built again if it is found, or chosen, again
            judged = self._record(r, goal, predicted, measured, last_resort)
            speedup = measured[-1][0]
            rounds_left = r + 1 < MAX_ROUNDS
            if judged >= target:
                long_goal = goal if long_goal is None else min(long_goal, goal)
                if judged <= MAX_OVERSHOOT * target:
                    # met well above the target: --search full (the mode for accuracy) tries a looser
                    # goal, since every channel kept counts (MiniLM 2x: a plan measured 2.13x against 2.06x)
                    relaxing = (self.search == "full" and relaxed < RELAX_ROUNDS and not bisected
                                and rounds_left and judged > target * RELAX_TRIGGER)
                    # every group at its smallest width prunes the most there is: unless it met the
                    # target closely, a round with the predictor calibrated on it looks for less
                    below_fastest = last_resort and rounds_left and judged > target * RELAX_TRIGGER
                    if not (relaxing or below_fastest):
                        break
                    relaxed += relaxing
                elif found_again and predicted > goal * MAX_OVERSHOOT:
                    # a looser goal brought back a plan already measured over the window, and the
                    # search still predicts it well above the goal: nothing that prunes less meets
                    # the goal (a model whose widths step coarsely: a grouped ConvTranspose of 4
                    # groups kept 2, measured 1.96x for 1.5x in six rounds of the same plan)
                    break
            else:
                # every goal up to this plan's prediction finds this plan again (it met those goals with
                # the least error): they are all short, and a goal measured enough below them is stale
                # (its plan, measured again, fell short: a small CNN in a noisy minute, whose goals then
                # bisected below a plan predicted 2.88x and measured 1.96x until the rounds ran out)
                short_goal = max(short_goal or 0.0, goal, predicted)
                if long_goal is not None and long_goal <= short_goal:
                    long_goal = None
                if relaxing:
                    if bisected or not rounds_left:
                        break  # _chosen keeps the plan that met the target
                    bisected = True
                else:
                    # a tighter goal brought back a plan already measured short, and the search's
                    # prediction no longer meets the goal: nothing faster is left to find
                    stuck = len(measured) > 1 and predicted < goal
                    if last_resort or stuck or not rounds_left:
                        if not (last_resort or _plan_key(self.fastest) in self.runs or _met(self.runs, target)):
                            # before giving up, the plan with every group at its smallest width, which
                            # the search, misled by the predictor, may not return (the small DenseNet
                            # at 1.5x: the search's plans 1.27x, that one 1.52x); past the rounds if need be
                            last_resort = True
                            continue
                        if last_resort or stuck:
                            self.beyond_reach = len(measured)
                        break
            if last_resort:
                # the fastest plan met the target where the search's did not: the predictor learns
                # from it, and a plan that prunes less is looked for below it
                last_resort = False
                self._calibrate(plan, judged)
                goal = target * (RELAX_AIM if relaxing else OVERSHOOT_MARGIN)
                short_goal, long_goal = None, cm.predicted_speedup(plan)
                continue
            aim = target * (RELAX_AIM if relaxing else OVERSHOOT_MARGIN)
            if r == 0:
                # the first measurement fits the predictor's exponent (CostModel.calibrate); goals are
                # in the calibrated predictor's units from here, so the search starts again at the target
                gamma = self._calibrate(plan, speedup)
                self.rounds[-1]["calibrated_gamma"] = gamma
                self.steps.note(f"predictor calibrated on round 1: gamma {gamma:.2f}")
                goal, short_goal, long_goal = aim, None, None
                if relaxing:  # the plan that met, in the calibrated units: a bound for bisecting
                    long_goal = cm.predicted_speedup(plan)
                continue
            goal = _next_goal(short_goal if judged < target else goal, judged, target, short_goal, long_goal, aim)
        return self._outcome()

    def _outcome(self) -> Outcome:
        chosen = _chosen(self.runs, self.target)
        if _lower_median(self.runs[chosen])[0] > MAX_OVERSHOOT * self.target:
            with self.steps("measure again the plan nearest below the target"):
                chosen = _settle(self.runs, self.target, self._measure_again, self.notes)
        plan, predicted = self.found[chosen]
        pruned, check = self.build(chosen)
        self.built.clear()
        return Outcome(plan, predicted, self.runs[chosen], pruned, check, self.rounds, self.beyond_reach)

    def _measure_again(self, key):
        return self.timer(self.model, self.build(key)[0], self.feeds)


def fastest_plan(analysis, widths, scores=None) -> dict:
    """Every group at its smallest useful width: its first channels (enough to time it), or with
    `scores` its best ones (a plan to emit)."""
    return {g.name: keep_top(scores[g.name], min(widths[g.name])) if scores else np.arange(min(widths[g.name]))
            for g in analysis.groups}


def _measurement(timed) -> tuple:
    """(speedup, dense_ms, pruned_ms, change between blocks); a timer may leave out the change."""
    speedup, dense_ms, pruned_ms, *change = timed
    return speedup, dense_ms, pruned_ms, change[0] if change else 1.0


def _plan_key(plan) -> tuple:
    """A plan (group -> kept channel indices) as a hashable value: the loop knows a plan it measured."""
    return tuple(sorted((group, tuple(int(i) for i in kept)) for group, kept in plan.items()))


def _chosen(runs: dict, target: float):
    """The plan to emit: the least pruning whose measurements meet the target (every extra channel
    removed costs accuracy), else the fastest measured."""
    per_plan = {k: _lower_median(v)[0] for k, v in runs.items()}
    met = [k for k in per_plan if per_plan[k] >= target]
    return min(met, key=per_plan.get) if met else max(per_plan, key=per_plan.get)


def _settle(runs: dict, target: float, measure_plan, notes: list):
    """The rounds ended with only plans over MAX_OVERSHOOT x target meeting it. On a noisy machine
    (sub-millisecond models, whose plans measure short and long in turn) the plan measured nearest
    below the target may meet it: within SETTLE_NEAR of it, it is measured twice more and judged
    by its median, as a plan found again is. Returns the plan to emit."""
    over = _chosen(runs, target)
    said = f"{OVER_THE_WINDOW} {_lower_median(runs[over])[0]:.2f}x, over {MAX_OVERSHOOT:g}x the target"
    below = [k for k in runs if _lower_median(runs[k])[0] < target]
    if not below:
        notes.append(f"{said}: the search found no plan that prunes less and is predicted to meet the target "
                     "(each group's widths step where the hardware runs fast)")
        return over
    near = max(below, key=lambda k: _lower_median(runs[k])[0])
    before = _lower_median(runs[near])[0]
    if before * SETTLE_NEAR < target:
        notes.append(f"{said}; the plan measured nearest below it ({before:.2f}x) misses the target by more than "
                     f"{SETTLE_NEAR - 1:.0%}")
        return over
    for _ in range(2 + (len(runs[near]) + 1) % 2):  # an odd count: the median is a measurement
        runs[near].append(_measurement(measure_plan(near)))
    chosen = _chosen(runs, target)
    notes.append(f"{said}; the plan measured nearest below it ({before:.2f}x) was measured again: "
                 + ", ".join(f"{m[0]:.2f}x" for m in runs[near])
                 + (", and its median meets the target" if chosen == near else ", still short"))
    return chosen


def _met(runs: dict, target: float) -> bool:
    return any(_lower_median(v)[0] >= target for v in runs.values())


def _lower_median(measurements):
    """The measurement a plan is judged by: the lower median of its (speedup, ...) tuples. A plan the
    search returns again is measured again; one fast block on a noisy machine must not pass a plan
    that its other measurements put below the target."""
    return sorted(measurements, key=lambda m: m[0])[(len(measurements) - 1) // 2]


def _next_goal(goal, speedup, target, short_goal, long_goal, aim):
    """Tighten by the measured shortfall, relax by the overshoot, towards `aim`; bisect once both
    are known."""
    if short_goal is not None and long_goal is not None:
        return (short_goal + long_goal) / 2
    if speedup < target:
        return goal * max(aim / speedup, 1.02)
    return goal * max(aim / speedup, 0.9)
