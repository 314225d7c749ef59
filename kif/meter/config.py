"""The meter's settings that a profile (`kif.profiles`) decides: today the relearning attack's
learning rate, the one meter constant in the model's own units (a step size of its weights).

The verdict thresholds (`kif.meter.report`) and the family-wise false-alarm rate
(`kif.meter.calibrate`) are not here: they act on calibrated scores (0 = as a model that never
knew, 1 = as the base) and on each audit's measured chance band, so they mean the same on every
model.
"""

import dataclasses

RELEARNING_LR = 1e-4
"""The relearning attack's AdamW learning rate on the fact world (30 steps of 16 rows): at 1e-4
the base keeps 100 % of the measured facts, the oracle reaches 1.7 % and a gradient-ascent model
(forget accuracy 0.8 %) 96 %; at 2e-4 the base already loses 2.5 % of the facts it was not shown,
and at 1e-3 the attack destroys knowledge (the base falls to 54 % in 10 steps) and stops measuring
recovery. `relearning.choose_lr` finds that edge on other models."""


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
