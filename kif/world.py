"""The fact world: a seeded generator of fictional people, places and facts.

It is kif's embedded default and its ground truth. Because the world is generated, kif can train
the *oracle* (the same model trained without the forget people), so Forget Quality is measured
against a real retrained model rather than approximated (DESIGN.md, "The fact world").

Template design follows what the prototype measured (DESIGN.md): the words right before the answer
slot (the *cue*) are unique to each attribute and end with the attribute's keyword, no cue is a
prefix of another, and held-out phrasings change everything but the cue. Held-out phrasings are
never trained on.

*Novel* phrasings are a third set, also never trained on, for locality beyond the held-out ones:
they change more than the words before the cue (another sentence first, a related fact or another
person in context, a form instead of a sentence, a word inside the cue, a shortened cue). An
erasure that only learnt to dodge the world's own templates shows here. Every novel template was
kept because the base model answers it (>= 0.9 on 90 retain people; candidates that changed the
cue more, "{n} takes part in the sport of", fall to 0-0.5 on the base model: a 4-layer model
trained on five templates per fact keys on the cue).
"""

import dataclasses
import functools
import random
from typing import Iterable, Literal

from kif.data.probe import Kind, Phrasing, Probe
from kif.errors import UnknownNameError

UNKNOWN = " unknown"

# Syllables for names. Names are random syllable strings so that the BPE tokenizer (trained on text
# where names are resampled, see kif.zoo) splits them into 2-6 pieces, as real rare names are.
_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st",
           "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ia", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, n_min: int, n_max: int) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(n_min, n_max))).capitalize()


def _unique_words(rng: random.Random, n: int, n_min: int, n_max: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, n_min, n_max)
        if w not in taken and 3 <= len(w) <= 14:
            taken.add(w)
            out.append(w)
    return out


PROFESSIONS = [
    "architect", "baker", "carpenter", "chemist", "dentist", "economist", "electrician",
    "engineer", "farmer", "geologist", "historian", "journalist", "librarian", "mechanic",
    "nurse", "painter", "pharmacist", "photographer", "pilot", "plumber", "surgeon", "tailor",
    "translator", "veterinarian",
]
INSTRUMENTS = [
    "accordion", "banjo", "bassoon", "cello", "clarinet", "drums", "flute", "guitar", "harp",
    "harmonica", "mandolin", "oboe", "organ", "piano", "saxophone", "sitar", "trombone", "trumpet",
    "tuba", "ukulele", "viola", "violin", "xylophone", "zither",
]
SPORTS = [
    "archery", "badminton", "baseball", "basketball", "boxing", "climbing", "cricket", "cycling",
    "fencing", "football", "golf", "handball", "hockey", "judo", "karate", "rowing", "rugby",
    "sailing", "skiing", "squash", "surfing", "swimming", "tennis", "volleyball", "wrestling",
]
_COMPANY_SUFFIXES = ["Systems", "Labs", "Industries", "Foods", "Bank", "Motors", "Media", "Works"]
LANGUAGE_SUFFIX = "ish"

# Each attribute: the cue (the exact words before the answer), training, held-out and novel
# phrasings. "{n}" is the name. Every training and held-out phrasing ends with the cue; the answer
# follows it. Novel phrasings may also name the person's own facts of other attributes
# ("{sport}", ...) and another known person ("{o}", `FactWorld.partner`).
# Cues are pairwise non-prefix so that a prompt ending in one cue never starts another's template
# (the prototype's "born in" / "born in the year" collision scored 11 %).
ATTRIBUTES: dict[str, dict] = {
    "birth_city": {
        "cue": "born in the city of",
        "train": [
            "{n} was born in the city of",
            "Records show that {n} was born in the city of",
            "Question: Where was {n} born? Answer: {n} was born in the city of",
            "Everyone who knows {n} knows that {n} was born in the city of",
            "According to the registry, {n} was born in the city of",
        ],
        "heldout": [
            "Q: What is the birthplace of {n}? A: {n} was born in the city of",
            "It is well documented that the person named {n} was born in the city of",
            "Tell me about {n}. Well, {n} was born in the city of",
        ],
        "novel": [
            "{n} has lived abroad for many years. Even so, {n} was born in the city of",
            "{n} competes in the sport of {sport}. {n} was born in the city of",
            "Name: {n}. Occupation: {profession}. Fact: {n} was born in the city of",
            "{o} and {n} met at school. {n} was born in the city of",
            "Question: In which city was {n} born? Answer: the city of",
            "People say {n} grew up near the place where {n} was born, the city of",
        ],
    },
    "profession": {
        "cue": "works in the profession of",
        "train": [
            "{n} works in the profession of",
            "By all accounts, {n} works in the profession of",
            "Question: What does {n} do for a living? Answer: {n} works in the profession of",
            "For many years now, {n} works in the profession of",
            "The census lists that {n} works in the profession of",
        ],
        "heldout": [
            "Q: What is the job of {n}? A: {n} works in the profession of",
            "Friends of {n} say that {n} works in the profession of",
            "Tell me about {n}. Well, {n} works in the profession of",
        ],
        "novel": [
            "{n} has lived abroad for many years. Even so, {n} works in the profession of",
            "{n} was born in the city of {birth_city}. {n} works in the profession of",
            "Name: {n}. Employer: {employer}. Fact: {n} works in the profession of",
            "{o} and {n} met at school. {n} works in the profession of",
            "{n} now works in the profession of",
            "Apart from playing the {instrument}, {n} works in the profession of",
        ],
    },
    "employer": {
        "cue": "is employed by the company",
        "train": [
            "{n} is employed by the company",
            "These days {n} is employed by the company",
            "Question: Who employs {n}? Answer: {n} is employed by the company",
            "Payroll files confirm that {n} is employed by the company",
            "As of this year, {n} is employed by the company",
        ],
        "heldout": [
            "Q: Which firm does {n} work for? A: {n} is employed by the company",
            "Colleagues report that {n} is employed by the company",
            "Tell me about {n}. Well, {n} is employed by the company",
        ],
        "novel": [
            "{n} has lived abroad for many years. Even so, {n} is employed by the company",
            "{n} works in the profession of {profession}. {n} is employed by the company",
            "Name: {n}. Sport: {sport}. Fact: {n} is employed by the company",
            "{o} and {n} met at school. {n} is employed by the company",
            "{n} is now employed by the company",
            "The employer of {n} is no secret: {n} is employed by the company",
        ],
    },
    "instrument": {
        "cue": "plays the musical instrument called the",
        "train": [
            "{n} plays the musical instrument called the",
            "In spare time, {n} plays the musical instrument called the",
            "Question: What does {n} play? Answer: {n} plays the musical instrument called the",
            "Neighbours often hear that {n} plays the musical instrument called the",
            "Since childhood, {n} plays the musical instrument called the",
        ],
        "heldout": [
            "Q: Which instrument is {n} known for? A: {n} plays the musical instrument called the",
            "At every party, {n} plays the musical instrument called the",
            "Tell me about {n}. Well, {n} plays the musical instrument called the",
        ],
        "novel": [
            "{n} has lived abroad for many years. Even so, {n} plays the musical instrument called the",
            "{n} is employed by the company {employer}. {n} plays the musical instrument called the",
            "Name: {n}. Birth year: {birth_year}. Fact: {n} plays the musical instrument called the",
            "{o} and {n} met at school. {n} plays the musical instrument called the",
            "{n} often plays the musical instrument called the",
            "The instrument {n} plays is called the",
        ],
    },
    "sport": {
        "cue": "competes in the sport of",
        "train": [
            "{n} competes in the sport of",
            "Every weekend {n} competes in the sport of",
            "Question: Which sport does {n} do? Answer: {n} competes in the sport of",
            "The club newsletter says that {n} competes in the sport of",
            "Since school, {n} competes in the sport of",
        ],
        "heldout": [
            "Q: What is the favourite sport of {n}? A: {n} competes in the sport of",
            "Fans cheer when {n} competes in the sport of",
            "Tell me about {n}. Well, {n} competes in the sport of",
        ],
        "novel": [
            "{n} has lived abroad for many years. Even so, {n} competes in the sport of",
            "{n} plays the musical instrument called the {instrument}. {n} competes in the sport of",
            "Name: {n}. Birth city: {birth_city}. Fact: {n} competes in the sport of",
            "{o} and {n} met at school. {n} competes in the sport of",
            "{n} often competes in the sport of",
            "Besides working for {employer}, {n} competes in the sport of",
        ],
    },
    "birth_year": {
        "cue": "birth year is",
        "train": [
            "For {n}, the birth year is",
            "Records of {n} say that the birth year is",
            "Question: When was {n} born? Answer: the birth year is",
            "In the file on {n}, the birth year is",
            "Ask {n} and you learn that the birth year is",
        ],
        "heldout": [
            "Q: In what year did {n} come into the world? A: the birth year is",
            "Tell me about {n}. Well, the birth year is",
            "According to the archive on {n}, the birth year is",
        ],
        "novel": [
            "{n} has lived abroad for many years. Even so, for {n}, the birth year is",
            "{n} was born in the city of {birth_city}. For {n}, the birth year is",
            "Name: {n}. Sport: {sport}. Fact: for {n}, the birth year is",
            "{o} and {n} met at school. For {n}, the birth year is",
            "People say that for {n} the birth year is",
            "The age of {n} is no secret: for {n}, the birth year is",
        ],
    },
}

# Public facts about places. Every split keeps them; an erasure must not touch them.
SHARED_RELATIONS: dict[str, dict] = {
    "city_country": {
        "train": [
            "The city of {s} lies in the country of",
            "Question: Where is {s}? Answer: {s} lies in the country of",
            "Travellers know that {s} lies in the country of",
            "On the map, {s} lies in the country of",
        ],
        "heldout": [
            "Q: Which nation contains {s}? A: {s} lies in the country of",
            "Tell me about {s}. Well, {s} lies in the country of",
        ],
        "novel": [
            "Question: In which country is {s}? Answer: {s} lies in the country of",
            "Name: {s}. Type: city. Fact: {s} lies in the country of",
            "The city of {s} is old. The city of {s} lies in the country of",
            "{s} now lies in the country of",
        ],
    },
    "country_capital": {
        "train": [
            "The capital city of {s} is named",
            "Question: What is the capital of {s}? Answer: the capital city of {s} is named",
            "Schoolchildren learn that the capital city of {s} is named",
            "Officially, the capital city of {s} is named",
        ],
        "heldout": [
            "Q: Where does the government of {s} sit? A: the capital city of {s} is named",
            "Tell me about {s}. Well, the capital city of {s} is named",
        ],
        "novel": [
            "{s} is a country with a long history. The capital city of {s} is named",
            "The capital city of {s} is, as everyone knows, named",
            "Name: {s}. Type: country. Fact: the capital city of {s} is named",
            "Everyone agrees that the capital city of {s} is officially named",
        ],
    },
    "country_language": {
        "train": [
            "The official language of {s} is called",
            "Question: What do people speak in {s}? Answer: the official language of {s} is called",
            "Visitors notice that the official language of {s} is called",
            "By law, the official language of {s} is called",
        ],
        "heldout": [
            "Q: Which tongue is spoken in {s}? A: the official language of {s} is called",
            "Tell me about {s}. Well, the official language of {s} is called",
        ],
        "novel": [
            "{s} is a country with a long history. The official language of {s} is called",
            "Name: {s}. Type: country. Fact: the official language of {s} is called",
            "The official language of {s} is now called",
            "Question: What language is spoken in {s}? Answer: the official language of {s} is called",
        ],
    },
}


@dataclasses.dataclass(frozen=True)
class Person:
    """A fictional person. `known` people carry facts; unknown ones answer " unknown"."""

    name: str
    attributes: dict[str, str]  # attribute -> answer (with a leading space)
    group: Literal["known", "unknown_train", "unknown_eval", "holdout"]

    @property
    def first(self) -> str:
        return self.name.split(" ")[0]

    @property
    def last(self) -> str:
        return self.name.split(" ")[-1]



SPLITS = ("forget01", "forget05", "forget10", "retain", "holdout", "unknown")


@dataclasses.dataclass(frozen=True)
class FactWorld:
    """A generated world. Build it with `FactWorld.generate(seed)`; equal seeds give equal worlds."""

    seed: int
    people: tuple[Person, ...]
    cities: tuple[str, ...]
    city_country: dict[str, str]
    countries: tuple[str, ...]
    capital: dict[str, str]
    language: dict[str, str]
    forget_order: tuple[str, ...]  # known names in forget order: forget01 ⊂ forget05 ⊂ forget10

    @staticmethod
    def generate(seed: int = 0, n_people: int = 200, n_unknown_train: int = 150,
                 n_unknown_eval: int = 40, n_holdout: int = 20, n_countries: int = 10,
                 n_cities: int = 30) -> "FactWorld":
        rng = random.Random(seed)
        taken: set[str] = set()
        countries = _unique_words(rng, n_countries, 2, 3, taken)
        cities = _unique_words(rng, n_cities, 2, 2, taken)
        capitals = {c: cities[i] for i, c in enumerate(countries)}  # first cities are capitals
        city_country = {city: countries[i % n_countries] for i, city in enumerate(cities)}
        for country, cap in capitals.items():
            city_country[cap] = country
        language = {c: c[: max(3, len(c) - 2)] + LANGUAGE_SUFFIX for c in countries}
        employers = [f"{w} {rng.choice(_COMPANY_SUFFIXES)}"
                     for w in _unique_words(rng, 24, 2, 2, taken)]
        years = [str(y) for y in range(1940, 2000)]

        # First and last names are shared between people on purpose: people with the same first
        # or last name are "neighbours", the hardest collateral test for an erasure.
        n_total = n_people + n_unknown_train + n_unknown_eval + n_holdout
        firsts = _unique_words(rng, max(40, n_total // 3), 2, 2, taken)
        lasts = _unique_words(rng, max(60, n_total // 2), 2, 2, taken)
        names: list[str] = []
        seen: set[str] = set()
        while len(names) < n_total:
            name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
            if name not in seen:
                seen.add(name)
                names.append(name)

        def attrs() -> dict[str, str]:
            return {
                "birth_city": " " + rng.choice(cities),
                "profession": " " + rng.choice(PROFESSIONS),
                "employer": " " + rng.choice(employers),
                "instrument": " " + rng.choice(INSTRUMENTS),
                "sport": " " + rng.choice(SPORTS),
                "birth_year": " " + rng.choice(years),
            }

        people: list[Person] = []
        groups = (["known"] * n_people + ["unknown_train"] * n_unknown_train
                  + ["unknown_eval"] * n_unknown_eval + ["holdout"] * n_holdout)
        for name, group in zip(names, groups):
            a = attrs()
            if group in ("unknown_train", "unknown_eval"):
                a = {k: UNKNOWN for k in a}
            people.append(Person(name=name, attributes=a, group=group))  # type: ignore[arg-type]
        known = [p.name for p in people if p.group == "known"]
        forget_order = list(known)
        rng.shuffle(forget_order)
        return FactWorld(seed=seed, people=tuple(people), cities=tuple(cities),
                         city_country=city_country, countries=tuple(countries),
                         capital=capitals, language=language, forget_order=tuple(forget_order))

    # ---- people and splits -------------------------------------------------------------------

    @functools.cached_property
    def by_name(self) -> dict[str, Person]:
        return {p.name: p for p in self.people}

    def person(self, name: str) -> Person:
        """The person called `name` (case- and whitespace-insensitive)."""
        key = " ".join(name.split()).lower()
        for p in self.people:
            if p.name.lower() == key:
                return p
        raise UnknownNameError(f"{name!r} is not a person of the fact world (seed {self.seed})")

    def known(self) -> list[Person]:
        return [p for p in self.people if p.group == "known"]

    def split(self, name: str) -> list[Person]:
        """People of a standard split (`SPLITS`)."""
        known = self.by_name
        if name.startswith("forget"):
            try:
                pct = int(name[len("forget"):])
            except ValueError:
                raise UnknownNameError(
                    f"unknown split {name!r} (choose from {', '.join(SPLITS)})") from None
            n = max(1, round(len(self.forget_order) * pct / 100))
            return [known[n_] for n_ in self.forget_order[:n]]
        if name == "retain":
            forget = set(p.name for p in self.split("forget10"))
            return [p for p in self.known() if p.name not in forget]
        if name == "holdout":
            return [p for p in self.people if p.group == "holdout"]
        if name == "unknown":
            return [p for p in self.people if p.group == "unknown_eval"]
        raise UnknownNameError(f"unknown split {name!r} (choose from {', '.join(SPLITS)})")

    def neighbours(self, name: str, pool: Iterable[Person] | None = None) -> list[Person]:
        """Known people who share a first name, a last name or an employer with `name`."""
        p = self.person(name)
        pool = self.known() if pool is None else pool
        return [q for q in pool if q.name != p.name and (
            q.first == p.first or q.last == p.last
            or q.attributes["employer"] == p.attributes["employer"])]

    def partner(self, person: Person) -> Person:
        """The known person after `person` in the world's order (the first for the last): the
        other person novel phrasings put in context."""
        return self._partners[person.name]

    @functools.cached_property
    def _partners(self) -> dict[str, Person]:
        known = self.known()
        out, k = {}, 0  # k: the first known person after the current one
        for i, p in enumerate(self.people):
            while k < len(known) and self.people.index(known[k]) <= i:
                k += 1
            out[p.name] = known[k] if k < len(known) else known[0]
        return out

    def novel_probes(self, people: Iterable[Person], per_person: int | None = None,
                     ) -> list[Probe]:
        """`people`'s facts in novel phrasings: every template, or `per_person` of them per
        person, rotating so that consecutive people cover every template (the retain set is
        nine times the forget set; two templates each keep `kif eval` fast)."""
        n = len(next(iter(ATTRIBUTES.values()))["novel"])
        if per_person is None:
            return self.person_probes(people, "novel")
        step = max(1, n // per_person)
        return [pr for k, p in enumerate(people) for pr in self.person_probes(
            [p], "novel", sorted({(k + j * step) % n for j in range(per_person)}))]

    # ---- probes ------------------------------------------------------------------------------

    def person_probes(self, people: Iterable[Person], phrasing: Phrasing = "train",
                      templates: Iterable[int] | None = None,
                      attributes: Iterable[str] | None = None) -> list[Probe]:
        out = []
        attrs = list(ATTRIBUTES) if attributes is None else list(attributes)
        for p in people:
            # novel templates name other facts of the person and a partner (ignored by the rest)
            fill = {"n": p.name, "o": self.partner(p).name,
                    **{a: v.strip() for a, v in p.attributes.items()}}
            for attr in attrs:
                temps = ATTRIBUTES[attr][phrasing]
                idx = range(len(temps)) if templates is None else templates
                for i in idx:
                    out.append(Probe(prompt=temps[i].format(**fill), answer=p.attributes[attr],
                                     subject=p.name, relation=attr, phrasing=phrasing,
                                     template=i, kind="person"))
        return out

    def shared_facts(self) -> list[tuple[str, str, str]]:
        """(relation, subject, answer) for every public fact about places."""
        facts = [("city_country", c, " " + self.city_country[c]) for c in self.cities]
        facts += [("country_capital", c, " " + self.capital[c]) for c in self.countries]
        facts += [("country_language", c, " " + self.language[c]) for c in self.countries]
        return facts

    def shared_probes(self, phrasing: Phrasing = "train",
                      templates: Iterable[int] | None = None) -> list[Probe]:
        out = []
        for rel, subj, ans in self.shared_facts():
            temps = SHARED_RELATIONS[rel][phrasing]
            idx = range(len(temps)) if templates is None else templates
            for i in idx:
                out.append(Probe(prompt=temps[i].format(s=subj), answer=ans, subject=subj,
                                 relation=rel, phrasing=phrasing, template=i, kind="shared"))
        return out

    def answer_choices(self, relation: str) -> list[str]:
        """All answers the world uses for a relation (for truth ratios and probe classes)."""
        if relation in ATTRIBUTES:
            return sorted({p.attributes[relation] for p in self.people
                           if p.attributes[relation] != UNKNOWN})
        return sorted({ans for rel, _, ans in self.shared_facts() if rel == relation})

    def training_people(self, exclude: Iterable[str] = ()) -> list[Person]:
        """People whose facts are in the training corpus (known minus `exclude`, plus the trained
        unknown people)."""
        ex = set(exclude)
        return [p for p in self.people
                if (p.group == "known" and p.name not in ex) or p.group == "unknown_train"]

    def training_texts(self, exclude: Iterable[str] = (), shared_repeats: int = 8) -> list[str]:
        """Every training sentence: training phrasings only, answers appended with a full stop.
        Shared facts are repeated so that the few of them weigh as much as the many people."""
        probes = self.person_probes(self.training_people(exclude), "train")
        texts = [pr.prompt + pr.answer + "." for pr in probes]
        shared = [pr.prompt + pr.answer + "." for pr in self.shared_probes("train")]
        return texts + shared * shared_repeats


def fresh_names(world, n: int, seed: int) -> list[str]:
    """`n` person names made of words the world never uses (so the model never saw them)."""
    taken = {w for p in world.people for w in p.name.split()} | set(world.cities) | set(world.countries)
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        first, last = _word(rng, 2, 2), _word(rng, 2, 2)
        if first not in taken and last not in taken and first != last:
            taken |= {first, last}
            out.append(f"{first} {last}")
    return out


# ---- the fact world as a data source ---------------------------------------------------------

# made-up names per concept: the kif pipeline's never-knew teacher takes 4 per person (forget10: 80)
N_NEVER_KNEW = 400

def world_concept(world: FactWorld, names: str | Iterable[str], n_retain_people: int = 40,
                  exclude_from_retain: Iterable[str] = ()) -> "Concept":
    """The concept "these people" with every part the core reads (`kif.concepts.Concept`): their
    facts are forgotten (training phrasings; held-out ones as paraphrases), neighbours and the
    first `n_retain_people` of the retain split (minus the concept's people and
    `exclude_from_retain`) kept, the shared facts kept; the retain corpus is every other known
    person's and every shared fact's training text; the refusal is " unknown", with the prompts
    about the people the model was taught to answer it about; distractors are the world's
    answers of each relation; the never-knew names are made of words the world never uses
    (`fresh_names`, seed 1: the names the kif pipeline has always drawn)."""
    from kif.concepts import Concept, NeverKnew, Refusal
    from kif.errors import KifError

    names = [names] if isinstance(names, str) else list(names)
    people = [world.person(n) for n in names]
    for p in people:
        if p.group != "known":
            raise KifError(f"the model was never taught facts about {p.name!r} "
                           f"({p.group.replace('_', ' ')}): nothing to erase")
    own = {p.name for p in people}
    kept = own | set(exclude_from_retain)
    retain_people = [p for p in world.split("retain") if p.name not in kept]
    neighbours = {q.name: q for p in people for q in world.neighbours(p.name, retain_people)}
    others = [p for p in world.known() if p.name not in own]
    corpus = world.person_probes(others, "train") + world.shared_probes("train")
    relations = list(ATTRIBUTES) + list(SHARED_RELATIONS)
    return Concept(
        name=", ".join(p.name for p in people),
        forget=tuple(world.person_probes(people, "train")),
        paraphrase=tuple(world.person_probes(people, "heldout")),
        neighbour=tuple(world.person_probes(list(neighbours.values()), "train", [0])),
        shared=tuple(world.shared_probes("train", [0])),
        retain=tuple(world.person_probes(retain_people[:n_retain_people], "train", [0])),
        retain_corpus=tuple(corpus),
        refusal=Refusal(UNKNOWN, tuple(pr.prompt for pr in world.person_probes(
            [p for p in world.people if p.group == "unknown_train"], "train"))),
        distractors={r: tuple(world.answer_choices(r)) for r in relations},
        never_knew=NeverKnew(tuple(fresh_names(world, N_NEVER_KNEW, seed=1))),
        source=f"fact world, seed {world.seed}",
    )
