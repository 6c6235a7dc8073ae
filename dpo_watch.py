"""Online DPO's collapse watch: ONE warning line when a run's logged metrics show the collapse
pattern, naming the checkpoint of its best eval so far. Plain Python, no torch.

The rule (`collapse_warning`, checked after every step; the trainer prints the first line only):

- eval fall: the latest eval's score (eval/exact_match when logged, else eval/reward_mean) is below
  the best earlier eval's by more than half of that best eval's gain over the first eval (and by
  more than 2 standard errors of the latest eval), the best being above the first. A run that
  gained and then lost most of the gain; a run that never gained is not "collapsing";
- chosen error up: the last CHOSEN_STEPS logged DPO steps in a row had the policy's error on the
  chosen sample above the reference's by more than CHOSEN_RISE of the reference's
  (dpo/chosen_err_above_ref > CHOSEN_RISE * dpo/ref_err_chosen): DPO keeps widening its margin by
  fitting the chosen sample worse too (Diffusion-SDPO's pathology);
- gradient blow-up: the last GRAD_STEPS logged DPO steps in a row had `update/grad_norm` above
  GRAD_RISE times the median of the run's first GRAD_EARLY logged steps. On the text world's
  collapsed seed (the preset, seed 4: exact match 0.427 at step 20, 0.323 at 30, 0.146 at 40) this is
  the signal that moved first with no false alarm on 8 runs that did not collapse: the DPO loss left
  log 2 at step 24, the grad norm passed 3x its early median at step 28, the eval showed the fall at
  step 30. That collapse was not the chosen-error pattern: both errors fell below the reference's,
  the rejected one faster (docs/objectives.md, "Keeping online DPO stable").

The line names output_dir/checkpoint-STEP of the best eval when that folder still exists
(checkpoints_total_limit may have rotated it out), else says none was kept.
"""

from __future__ import annotations

import os

EVAL_FALL_FRACTION = 0.5  # of the best eval's gain over the first eval
EVAL_FALL_STANDARD_ERRORS = 2.0
CHOSEN_RISE = 0.1  # chosen error above the reference's by more than 10 % of the reference's ...
CHOSEN_STEPS = 3  # ... this many logged DPO steps in a row
GRAD_RISE, GRAD_STEPS, GRAD_EARLY = 3.0, 2, 10  # grad norm > 3x the first 10 steps' median, 2 steps in a row


def _eval_score(row: dict) -> tuple[str, float, float] | None:
    """-> (name, score, standard error) of an eval row, or None for a training row."""
    for name in ("eval/exact_match", "eval/reward_mean"):
        if isinstance(row.get(name), (int, float)):
            se = row.get(name.replace("_mean", "") + "_se", 0.0)
            return name, float(row[name]), float(se) if isinstance(se, (int, float)) else 0.0
    return None


def eval_fall(rows: list[dict]) -> tuple[int, str] | None:
    """-> (step of the best earlier eval, reason) when the latest eval fell by the rule above, else None."""
    evals = [(row["step"], score) for row in rows if "step" in row and (score := _eval_score(row))]
    if len(evals) < 3:  # the first eval, a best one after it, the latest
        return None
    first, latest = evals[0][1][1], evals[-1][1]
    best_step, (name, best, _) = max(evals[:-1], key=lambda e: (e[1][1], -e[0]))  # earliest of equal bests
    fall = best - latest[1]
    if best <= first or fall <= EVAL_FALL_FRACTION * (best - first) or fall <= EVAL_FALL_STANDARD_ERRORS * latest[2]:
        return None
    return best_step, (f"{name} fell to {latest[1]:.4g} at step {evals[-1][0]} from its best {best:.4g} "
                       f"(step {best_step}; first eval {first:.4g})")


def chosen_error_rise(rows: list[dict]) -> str | None:
    """-> the reason when the last CHOSEN_STEPS training rows all had the chosen error up by the rule
    (a step without a DPO update, e.g. no pairs, breaks the run of steps)."""
    last = [row for row in rows if _eval_score(row) is None][-CHOSEN_STEPS:]
    if len(last) < CHOSEN_STEPS:
        return None
    if all(row.get("dpo/chosen_err_above_ref", 0.0) > CHOSEN_RISE * abs(row.get("dpo/ref_err_chosen", 0.0))
           and "dpo/chosen_err_above_ref" in row for row in last):
        return (f"the policy's error on the chosen samples was above the reference's by more than "
                f"{CHOSEN_RISE:.0%} of it for {CHOSEN_STEPS} steps in a row (to step {last[-1]['step']})")
    return None


def grad_blow_up(rows: list[dict]) -> str | None:
    """-> the reason when the last GRAD_STEPS DPO steps all had a grad norm above GRAD_RISE x the
    median of the run's first GRAD_EARLY DPO steps (none before GRAD_EARLY + GRAD_STEPS steps)."""
    norms = [(row["step"], row["update/grad_norm"]) for row in rows
             if "dpo/loss" in row and isinstance(row.get("update/grad_norm"), (int, float))]
    if len(norms) < GRAD_EARLY + GRAD_STEPS:
        return None
    early = sorted(norm for _, norm in norms[:GRAD_EARLY])
    median = (early[(GRAD_EARLY - 1) // 2] + early[GRAD_EARLY // 2]) / 2
    if all(norm > GRAD_RISE * median for _, norm in norms[-GRAD_STEPS:]):
        return (f"the grad norm was above {GRAD_RISE:g}x its early median ({median:.3g}) for {GRAD_STEPS} "
                f"steps in a row (to step {norms[-1][0]}: {norms[-1][1]:.3g})")
    return None


def best_eval_step(rows: list[dict]) -> int | None:
    evals = [(row["step"], score[1]) for row in rows if "step" in row and (score := _eval_score(row))]
    return max(evals, key=lambda e: (e[1], -e[0]))[0] if evals else None


def collapse_warning(rows: list[dict], output_dir: str) -> str | None:
    """rows: the run's metrics rows so far (training and eval, each with "step"), oldest first.
    -> the one-line warning when the latest rows show the collapse pattern, else None."""
    fell = eval_fall(rows)
    reason = fell[1] if fell else chosen_error_rise(rows) or grad_blow_up(rows)
    if reason is None:
        return None
    best = fell[0] if fell else best_eval_step(rows)
    folder = os.path.join(output_dir, f"checkpoint-{best}") if best is not None else None
    if folder is not None and os.path.isdir(folder):
        where = f"the best eval so far (step {best}) is in {folder}"
    elif best is not None:
        where = f"no checkpoint was kept for the best eval so far (step {best})"
    else:
        where = "no eval yet, so no best checkpoint"
    return (f"warning: online DPO may be collapsing: {reason}; {where} "
            "(docs/objectives.md, \"Keeping online DPO stable\")")


class CollapseWatch:
    """The trainer's side: collects the rows it logs, prints the first warning and then stays quiet."""

    def __init__(self, output_dir: str, earlier_rows: list[dict] | None = None):
        self.output_dir, self.rows, self.warned = output_dir, list(earlier_rows or []), False

    def add(self, metrics: dict, step: int):
        self.rows.append({**metrics, "step": step})

    def check(self) -> str | None:
        """-> the warning line the first time the rule holds, else None."""
        if self.warned:
            return None
        line = collapse_warning(self.rows, self.output_dir)
        self.warned = line is not None
        return line
