"""The fact world's concepts written as files, in kif's JSONL or as TOFU ships its QA files.

This is the fact world's side of `kif.data`: unlike the readers (`kif.data.formats`), it imports
`kif.world`. It lets the file path be tested against the world's ground truth (export a split,
load it back with `load_concept`, compare with the world's own probe sets), and gives users
example files of each format.

The probe sets are those of the world's concept (`kif.world.world_concept`) and of `kif eval`:
the split's people in their training phrasings (forget) and held-out ones (paraphrase); their
neighbours among the retain people in training templates (0, 2); every other known person and
the shared facts in every training phrasing (the retain corpus); the novel phrasings `kif eval`
scores (rows marked "novel"); refusal rows (the people the model
was taught to answer " unknown" about); and `never_knew.txt`, the made-up names of the world's
never-knew reference. Every row carries five wrong answers of its relation as distractors, drawn
with a seeded `random.Random(0)`, so equal worlds give equal files.
"""

import json
import os
import pathlib
import random
from typing import Callable

from kif import integrity
from kif.data.formats import kif_record
from kif.data.probe import Probe
from kif.errors import KifError
from kif.world import ATTRIBUTES, N_NEVER_KNEW, SHARED_RELATIONS, FactWorld, fresh_names

# training templates scored for the retain people and neighbours (kif.evaluation's
# RETAIN_TEMPLATES; not imported, as kif.evaluation loads transformer_lens)
KEPT_TEMPLATES = (0, 2)
NOVEL_PER_PERSON = 2  # kif.evaluation.NOVEL_PER_PERSON
N_DISTRACTORS = 5
FORMATS = ("kif", "tofu")


def _probe_sets(world: FactWorld, forget_split: str) -> dict[str, list[Probe]]:
    """split -> the world's probes, as `kif.evaluation.evaluate` builds them."""
    forget = world.split(forget_split)
    names = {p.name for p in forget}
    retain = [p for p in world.split("retain") if p.name not in names]
    neighbours = {q.name: q for p in forget for q in world.neighbours(p.name, retain)}
    return {"forget": world.person_probes(forget, "train"),
            "paraphrase": world.person_probes(forget, "heldout"),
            "neighbour": world.person_probes(list(neighbours.values()), "train", KEPT_TEMPLATES),
            # every other known person (the world concept's retain corpus: for forget01 it holds
            # the rest of forget10 too)
            "retain": world.person_probes([p for p in world.known() if p.name not in names],
                                          "train"),
            "shared": world.shared_probes("train"),
            # held-out phrasings for kif eval (retain_paraphrase_acc, model utility): the
            # retain split's people, as `kif eval` scores them
            "retain_heldout": world.person_probes(retain, "heldout"),
            "shared_heldout": world.shared_probes("heldout"),
            # novel phrasings, as `kif eval` scores them (its *_novel_acc keys)
            "paraphrase_novel": world.novel_probes(forget),
            "neighbour_novel": world.novel_probes(list(neighbours.values()), NOVEL_PER_PERSON),
            "retain_novel": world.novel_probes(retain, NOVEL_PER_PERSON),
            "shared_novel": world.shared_probes("novel"),
            "refusal": world.person_probes([p for p in world.people if p.group == "unknown_train"],
                                           "train")}


def _distractor_picker(world: FactWorld) -> Callable[[Probe], tuple[str, ...]]:
    """Wrong answers per fact: drawn once per (subject, relation), so every phrasing of a fact
    and both file formats give the same ones."""
    rng = random.Random(0)
    choices: dict[str, list[str]] = {}
    picked: dict[tuple[str, str], tuple[str, ...]] = {}

    def pick(p: Probe) -> tuple[str, ...]:
        key = (p.subject, p.relation)
        if key not in picked:
            if p.relation not in choices:
                choices[p.relation] = world.answer_choices(p.relation)
            wrong = [a for a in choices[p.relation] if a != p.answer]
            picked[key] = tuple(rng.sample(wrong, min(N_DISTRACTORS, len(wrong))))
        return picked[key]

    return pick


# ---- kif JSONL -------------------------------------------------------------------------------

def _kif_row(p: Probe, split: str, distractors: tuple[str, ...]) -> str:
    return json.dumps(kif_record(p, split, distractors), ensure_ascii=False)


def _kif_files(sets: dict[str, list[Probe]], pick) -> dict[str, str]:
    files = {"forget.jsonl": ("forget", "paraphrase", "paraphrase_novel"),
             "neighbour.jsonl": ("neighbour", "neighbour_novel"),
             "retain.jsonl": ("retain", "shared", "retain_heldout", "shared_heldout",
                              "retain_novel", "shared_novel", "refusal")}
    return {name: "".join(_kif_row(p, s.split("_")[0], pick(p)) + "\n"
                          for s in splits for p in sets[s])
            for name, splits in files.items()}


# ---- TOFU ------------------------------------------------------------------------------------

def _bare(answer: str) -> str:
    """TOFU ships answers without the space that separates them from the question."""
    return answer[1:] if answer.startswith(" ") else answer


def _heldout_prompt(p: Probe) -> str:
    """The held-out phrasing paired with training template t: held-out template t % n."""
    if p.kind == "shared":
        temps = SHARED_RELATIONS[p.relation]["heldout"]
        return temps[p.template % len(temps)].format(s=p.subject)
    temps = ATTRIBUTES[p.relation]["heldout"]
    return temps[p.template % len(temps)].format(n=p.subject)


def _tofu_row(p: Probe, distractors: tuple[str, ...]) -> dict:
    row = {"question": p.prompt, "answer": _bare(p.answer),
           "paraphrased_question": _heldout_prompt(p), "paraphrased_answer": _bare(p.answer),
           "perturbed_answer": [_bare(a) for a in distractors], "subject": p.subject,
           "relation": p.relation}  # kif's extension, as is "split" below
    if p.kind == "shared":
        row["split"] = "shared"  # kif's extension: TOFU itself has no shared facts
    return row


def _tofu_files(sets: dict[str, list[Probe]], pick) -> dict[str, str]:
    # forget.json's paraphrased questions are the paraphrase set: it needs no rows of its own
    files = {"forget.json": ("forget",), "neighbour.json": ("neighbour",),
             "retain.json": ("retain", "shared")}
    out = {name: json.dumps([_tofu_row(p, pick(p)) for s in splits for p in sets[s]],
                            ensure_ascii=False, indent=1) + "\n"
           for name, splits in files.items()}
    # TOFU has no refusal rows: they travel as kif JSONL, a second retain file
    out["refusal.jsonl"] = "".join(_kif_row(p, "refusal", ()) + "\n" for p in sets["refusal"])
    return out


# ---- writing ---------------------------------------------------------------------------------

def _write_folder(out_dir: str | os.PathLike, files: dict[str, str]) -> pathlib.Path:
    """Write `files` into a temporary sibling of `out_dir`, then rename it into place: a reader
    never sees half the files. An existing non-empty `out_dir` is refused, never overwritten."""
    out = pathlib.Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KifError(f"{out} exists and is not empty: choose a new output folder")
    with integrity.staged(out) as stage, integrity.writing(out):
        for name, text in files.items():
            (stage / name).write_text(text, encoding="utf-8")
        os.chmod(stage, 0o755)  # mkdtemp's folder is private; the export is ordinary output
        integrity.publish(stage, out)  # an empty `out` (checked above) is replaced
    return out


def export_world(world: FactWorld, forget_split: str, fmt: str = "kif", *,
                 out_dir: str | os.PathLike) -> pathlib.Path:
    """Write the concept "the people of `forget_split`" to the new folder `out_dir`.

    `fmt="kif"`: `forget.jsonl` (forget and paraphrase rows), `neighbour.jsonl`, `retain.jsonl`
    (retain, shared and refusal rows), `never_knew.txt`. `fmt="tofu"`: `forget.json`, `neighbour.json`, `retain.json`, JSON
    arrays of `{question, answer, paraphrased_question, paraphrased_answer, perturbed_answer,
    subject}`, training template t paired with held-out template t % n of the same fact, plus
    `refusal.jsonl` (kif JSONL) and `never_knew.txt`. Returns the folder."""
    if fmt not in FORMATS:
        raise KifError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    sets = _probe_sets(world, forget_split)
    pick = _distractor_picker(world)
    files = _kif_files(sets, pick) if fmt == "kif" else _tofu_files(sets, pick)
    files["never_knew.txt"] = "".join(n + "\n" for n in fresh_names(world, N_NEVER_KNEW, seed=1))
    return _write_folder(out_dir, files)
