"""The meter's settings that a profile (`kif.profiles`) decides: today the relearning attack's
learning rate, the one meter constant in the model's own units (a step size of its weights).

The verdict thresholds (`kif.meter.report`) and the family-wise false-alarm rate
(`kif.meter.calibrate`) are not here: they act on calibrated scores (0 = as a model that never
knew, 1 = as the base) and on each audit's measured chance band, so they mean the same on every
model.
"""

import dataclasses

RELEARNING_LR = 1e-4
"""The relearning attack's AdamW learning rate tuned on the fact world (30 steps of 16 rows): the
strongest rate at which the attack on the base still keeps the facts it was not shown; above it
the attack destroys knowledge and stops measuring recovery. `relearning.choose_lr` finds that edge
on other models (the measured accuracies per rate: results/meter_relearning_lr.json and the
README)."""


@dataclasses.dataclass(frozen=True)
class MeterConfig:
    # None: the strongest rate of `relearning.LR_GRID` that keeps the base's facts, chosen on the
    # audited base model (`relearning.choose_lr`); a number: that rate
    relearning_lr: float | None = RELEARNING_LR

    def __post_init__(self) -> None:
        from kif.errors import KifError

        if self.relearning_lr is not None and not self.relearning_lr > 0:
            raise KifError(f"relearning_lr must be > 0, got {self.relearning_lr}")


__all__ = ["MeterConfig", "RELEARNING_LR"]
