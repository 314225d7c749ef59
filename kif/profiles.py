"""Named settings profiles: which of kif's constants were tuned on one model, and what replaces them
on another.

Every method's config dataclass defaults to the values measured on the fact world's 4-layer GPT-2
(the `fact-world` profile). Some of those name that model: a hook (`blocks.0.hook_resid_mid`), a
gate threshold in its z units (tau 12). The `auto` profile chooses them per model instead: the
site by how well the concept's gate separates (`suppress.best_capsule`), each person's gate
threshold from its own z-scores (`suppress.calibrated_tau`), layers by attribution (STAMP) or by
relative depth (RMU). What no model-side measurement replaces yet (STAMP's forget weight, the
training baselines' learning rates, the meter's verdict thresholds and the relearning attack's steps)
stays the fact world's in both profiles and is listed as such, so that a manifest says which numbers were
carried over from a model they were not tuned on.

A profile is applied under the user's own settings (`--set`, a config object): it changes only the
fields the user left at their defaults.
"""

import dataclasses
from typing import Any, Mapping

from kif import settings
from kif.errors import UnknownNameError


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    # method -> config field -> value, applied over the config dataclass's defaults
    settings: Mapping[str, Mapping[str, Any]]
    # method -> config fields whose value is the fact world's (tuned there, not chosen per model)
    carried: Mapping[str, tuple[str, ...]]


# the constants tuned on the fact world that no per-model choice replaces yet
_CARRIED = {
    "suppress": ("k_gate", "beta", "s", "whiten"),
    "kif": ("lr", "steps", "w_retain", "unbind_weight", "npo_beta", "rank", "stamp_forget_weight"),
    "stamp": ("forget_weight", "token_weight", "lam", "opt_steps", "opt_lr", "opt_decay", "opt_stop",
              "spread"),
    "ga": ("lr", "steps"), "gradiff": ("lr", "steps"), "npo": ("lr", "steps", "beta"),
    "rmu": ("lr", "steps", "c", "alpha"),
    # the noise share and the distillation budget: about 80 % re-initialisation was needed to
    # delete on the fact world, and 600 steps to give the retain facts back
    "undo": ("alpha", "steps", "lr", "shared_repeats"),
}


def meter_constants(skip: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The meter's settings that were tuned on the fact world (read from the modules that use
    them, so the record cannot drift from the code), less the `kif.meter.config` fields in
    `skip` (chosen on the model). The verdict thresholds act on calibrated scores and measured
    chance bands, but their values were still set looking at the fact world's audits."""
    from kif.meter import calibrate, report
    from kif.meter.probes import relearning

    attack = {"steps": relearning.STEPS, "batch": relearning.BATCH}
    if "relearning_lr" not in skip:
        attack["lr"] = relearning.LR
    return {"relearning": attack,
            "verdict": {"intact_surface": report.INTACT_SURFACE,
                        "suppressed_latent": report.SUPPRESSED_LATENT,
                        "min_families": report.MIN_FAMILIES,
                        "family_alpha": calibrate.FAMILY_ALPHA}}

PROFILES: dict[str, Profile] = {
    "fact-world": Profile(
        "fact-world",
        "the constants measured on the fact world's 4-layer GPT-2 (the configs' defaults)",
        settings={}, carried=_CARRIED),
    "auto": Profile(
        "auto",
        "sites and thresholds chosen on the model: the capsule's and the kif signature's residual "
        "site by gate separation, each person's gate threshold from its own z-scores; STAMP (and "
        "the kif pipeline's start) spread over layers toward optimized targets, its forget weight "
        "the smallest that erases the forget prompts; the meter's relearning rate the strongest "
        "that keeps the base's facts",
        settings={"suppress": {"hook": None, "tau": None},
                  "stamp": {"target": "optimized", "forget_weight": None},
                  "kif": {"signature_hook": None, "stamp_target": "optimized",
                          "stamp_forget_weight": None},
                  "meter": {"relearning_lr": None}},
        carried=_CARRIED),
}

# the zoo models the fact-world constants were measured on
_TUNED_ON = ("fact-world", "fact-world-oracle-forget01", "fact-world-oracle-forget05",
             "fact-world-oracle-forget10")


def get(name: str) -> Profile:
    if name not in PROFILES:
        raise UnknownNameError(f"unknown settings profile {name!r} (choose from "
                               f"{', '.join(PROFILES)})")
    return PROFILES[name]


def default_for(model) -> str:
    """`fact-world` on the model its constants were measured on, `auto` on every other."""
    return "fact-world" if getattr(model, "kif_name", None) in _TUNED_ON else "auto"


def configure(method: str, cfg_type: type, profile: Profile, user: Mapping[str, Any] | Any | None):
    """`cfg_type` with the profile's settings for `method` under the user's (a mapping of fields
    or a config object, whose fields that differ from the defaults win)."""
    fields = {f.name for f in dataclasses.fields(cfg_type)}
    base = dict(profile.settings.get(method, {}))
    if user is None:
        return cfg_type(**base)
    if isinstance(user, cfg_type):
        default = cfg_type()
        changed = {f: getattr(user, f) for f in fields if getattr(user, f) != getattr(default, f)}
        return cfg_type(**{**base, **changed})
    return cfg_type(**{**base, **settings.checked(method, cfg_type, user)})


def describe(profile: Profile, method: str, cfg: Any) -> dict[str, Any]:
    """What a manifest records: the profile, the fields it chose on the model, and the fact
    world's constants the method used as they are."""
    chosen = {k: getattr(cfg, k) for k in profile.settings.get(method, {}) if hasattr(cfg, k)}
    carried = {k: getattr(cfg, k) for k in profile.carried.get(method, ())
               if hasattr(cfg, k) and k not in chosen}
    return {"name": profile.name, "chosen_on_the_model": sorted(chosen),
            "fact_world_constants": carried}


__all__ = ["PROFILES", "Profile", "configure", "default_for", "describe", "get", "meter_constants"]
