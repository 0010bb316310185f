"""The objective of a trial, maximised: the gain on the new domain minus a penalty on forgetting,
from the trained model's held-out losses and the base's (nats/token). Pure; computed in the training
loop at every report (``run_training(report_metrics=...)``)."""

from __future__ import annotations

import dataclasses

from llamapro.tune.plan import TunePlan

METRIC, MODE, TIME_ATTR = "objective", "max", "step"
"""What Tune optimises, in which direction, and the clock of its scheduler (optimizer steps)."""


def objective_metrics(losses: dict, baseline: dict, domain: list[str], retention: list[str],
                      penalty: float, max_forgetting: float | None) -> dict:
    """Gain, forgetting and the objective from held-out losses and the base's (nats/token)."""
    gain = sum(baseline[s] - losses[s] for s in domain) / len(domain)
    forgetting = max((losses[s] - baseline[s] for s in retention), default=0.0)
    out = {"domain_loss": sum(losses[s] for s in domain) / len(domain),
           "domain_gain": gain, "forgetting": forgetting,
           "objective": gain - penalty * max(0.0, forgetting),
           "feasible": max_forgetting is None or forgetting <= max_forgetting}
    if retention:
        out["retention_loss"] = max(losses[s] for s in retention)
    return out


@dataclasses.dataclass(frozen=True)
class TrialObjective:
    """The objective of one trial, computed where the metrics are made: the training loop calls it
    on every report (``run_training(report_metrics=...)``) and Ray's stock ``TuneReportCallback``
    hands rank 0's metrics to Tune unchanged. Stateless (it travels to the workers and survives a
    worker-group restart): a held-out set not evaluated in a report counts at the base's loss, as
    the model is the base before the first evaluation."""

    baseline: dict
    domain: list
    retention: list
    penalty: float
    max_forgetting: float | None

    @classmethod
    def of(cls, baseline: dict, plan: TunePlan | dict) -> "TrialObjective":
        plan = TunePlan.of(plan)
        return cls(dict(baseline), list(plan.domain_sets), list(plan.retention_sets),
                   plan.penalty, plan.max_forgetting)

    def __call__(self, metrics: dict) -> dict:
        losses = {n: float(metrics.get(f"eval_loss/{n}", b)) for n, b in self.baseline.items()}
        out = {f"eval_loss/{n}": v for n, v in losses.items()}
        out.update({f"base_loss/{n}": v for n, v in self.baseline.items()})
        out.update(objective_metrics(losses, self.baseline, self.domain, self.retention,
                                     self.penalty, self.max_forgetting))
        return out
