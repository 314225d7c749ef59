"""Self-built probes: a concept's facts elicited from the model itself, given only a name (RWKU's
setting: the user names a target and has no forget corpus).

1. *Statements.* Each opener of the bank (`kif.data.elicit_bank.OPENERS`) about the name is
   continued greedily and by sampling, and cut at the end of its first sentence.
2. *Where the fact starts.* The same continuation is scored with the name replaced by made-up
   names of the same shape. Tokens the model predicts whoever the subject is (" the city of")
   are the cue; the first token it predicts for the name but not for most made-up names starts
   the answer. A statement with no such token says nothing about the subject.
3. *Verification.* Every (cue, answer) candidate is put in the training frames
   (`TRAIN_FRAMES`): its *consistency* is the share of frames whose greedy continuation is the
   answer, its *probability* TOFU's length-normalized answer probability averaged over them, and
   its *made-up agreement* the share of made-up names for which the model gives the same answer
   (an answer it gives about anyone is a default, not a fact). The thresholds are
   `ElicitConfig`'s; every candidate, kept or not, carries this evidence into the probes file, so
   that a person can review it, flip `keep`, and pass the file back with `--forget FILE`.
4. *Probes.* A kept fact's training frames are forget probes, its held-out frames
   (`HELDOUT_FRAMES`, never used to choose or fit) paraphrases. Neighbours are the names the
   user lists, else names that the model's own continuations bring up, elicited the same way
   (their facts are kept, not erased). The never-knew reference is the made-up names. The
   refusal is what the model says at the kept cues about made-up names, when most of them get
   one answer (" unknown" on the fact world); otherwise there is none, and a method that needs
   one asks for `--refusal`.

Scope: named entities. A topic with no capitalised word ("bioweapons") has no subject token to
locate and is refused (pass a forget corpus instead).
"""

import dataclasses
import random
import re
import unicodedata
from collections import Counter
from typing import Sequence

import numpy as np

from kif.data.elicit_bank import DISCOVERY, HELDOUT_FRAMES, NOT_NAMES, OPENERS, TRAIN_FRAMES
from kif.errors import KifError

_SENTENCE_END = re.compile(r"[.!?\n]")
_ANSWER_END = re.compile(r"[,;:()\"]")
_VOWELS, _CONSONANTS = "aeiou", "bdfghklmnprstvz"


@dataclasses.dataclass(frozen=True)
class ElicitConfig:
    max_new_tokens: int = 12  # per continuation of an opener
    max_answer_tokens: int = 6
    samples: int = 2  # sampled continuations per opener, beside the greedy one
    temperature: float = 0.7
    made_up: int = 6  # made-up names: the subject test of step 2 and the never-knew reference
    min_consistency: float = 0.8  # share of training frames that must give the answer
    min_prob: float = 0.3  # mean answer probability over the training frames
    max_made_up_agree: float = 0.34  # share of made-up names that may get the same answer
    neighbours: int = 3  # neighbours kept when the user lists none
    retain_subjects: int = 32  # other subjects the model states facts about, kept (retain)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Fact:
    """One candidate fact about `subject` and the evidence that decided it (`kept`, `reason`)."""

    subject: str
    cues: tuple[str, ...]  # the words after the name that the model put before the answer
    answer: str
    openers: tuple[str, ...]  # the openers whose continuations stated it
    consistency: float
    prob: float
    made_up_agree: float
    made_up_prob: float  # the median probability of the made-up names' own answers (guesses)
    made_up_answers: tuple[str, ...]  # the model's greedy answer at the first cue, per made-up name
    kept: bool
    reason: str

    @property
    def relation(self) -> str:
        return " ".join(self.cues[0].split())

    def prompts(self, frames: Sequence[str], name: str | None = None) -> list[str]:
        """The fact's prompts in `frames`, about `name` (default: its subject)."""
        who = self.subject if name is None else name
        return [f.format(s=who + cue) for cue in self.cues for f in frames]


@dataclasses.dataclass(frozen=True)
class Elicited:
    """What the model said about each subject: every candidate fact, kept or not."""

    subjects: tuple[str, ...]
    facts: tuple[Fact, ...]
    made_up: tuple[str, ...]
    names_seen: tuple[str, ...]  # other names the continuations brought up, most frequent first
    config: ElicitConfig

    def kept(self, subject: str | None = None) -> list[Fact]:
        return [f for f in self.facts if f.kept and subject in (None, f.subject)]


# ---- names -------------------------------------------------------------------------------------

def check_name(name: str) -> str:
    """`name` stripped, or a one-line error for what is not a named entity."""
    name = " ".join(str(name).split())
    if not name:
        raise KifError("an empty name: kif builds probes about a named subject")
    if not any(w[:1].isupper() or w[:1].isdigit() for w in name.split()):
        raise KifError(f"{name!r} is not a name (no capitalised word): kif builds probes about "
                       f"named entities (a person, a place, a work, an organisation); for a "
                       f"topic, pass a forget corpus with --forget FILE")
    return name


def made_up_names(names: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """`n` names of the shape of `names[0]` that share no word with any of `names`: names the
    model never saw. An ASCII word becomes one of about its length, alternating consonants and
    vowels; in a word with letters outside ASCII every letter is replaced by another of its kind
    (`_like`), so a non-ASCII letter by a nearby one of the same script and case. The script
    must hold: a model may give one confident answer to every name written in letters it never
    saw, and only made-up names written in such letters show that answer for the default it
    is."""
    taken = {w.lower() for nm in names for w in nm.split()}
    rng = random.Random(f"kif-made-up:{seed}:{names[0]}")
    out: list[str] = []
    for _ in range(1000 * n):
        if len(out) == n:
            break
        words = [_made_up_word(w, rng) for w in names[0].split()]
        # a word without letters ("No. 5", "№5") stays as it is and names no one
        named = {w.lower() for w in words if any(c.isalpha() for c in w)}
        if named and not taken & named:
            taken |= named
            out.append(" ".join(words))
    if len(out) < n:
        raise KifError(f"cannot make {n} made-up names shaped like {names[0]!r}: it has too "
                       f"few letters to vary")
    return out


def _made_up_word(w: str, rng: random.Random) -> str:
    if not w.isascii() or not any(c.isalpha() for c in w):
        return "".join(_like(c, rng) for c in w)
    k = max(3, len(w) + rng.choice((-1, 0, 1)))
    start = rng.random() < 0.5
    return "".join(rng.choice(_CONSONANTS if (i % 2 == 0) != start else _VOWELS)
                   for i in range(k)).capitalize()


def _like(c: str, rng: random.Random) -> str:
    """Another letter of `c`'s kind (`made_up_names`); `c` itself when it is no letter."""
    if not c.isalpha():
        return c
    if c.isascii():
        pool = _VOWELS if c.lower() in _VOWELS else _CONSONANTS
        new = rng.choice([x for x in pool if x != c.lower()])
        return new.upper() if c.isupper() else new
    script = unicodedata.name(c, "").split(" ")[0]
    near = [chr(o) for o in range(max(0x80, ord(c) - 48), ord(c) + 49)
            if chr(o) != c and chr(o).isalpha() and chr(o).isupper() == c.isupper()
            and unicodedata.name(chr(o), "").split(" ")[0] == script]
    return rng.choice(near) if near else c


def names_in(texts: Sequence[str], like: str, exclude: Sequence[str]) -> list[str]:
    """Capitalised word sequences as long as `like` in `texts` (not cut by a text's end), most
    frequent first, without the `exclude`d names or the bank's own words."""
    k = len(like.split())
    pattern = re.compile(r"\b" + r"\s".join([r"([A-Z][\w'-]+)"] * k) + r"(?=[^\w'-])")
    skip = set(exclude)
    found: Counter = Counter()
    for t in texts:
        for m in pattern.finditer(t):
            words = m.groups()
            name = " ".join(words)
            if name not in skip and not NOT_NAMES & set(words):
                found[name] += 1
    return [n for n, _ in found.most_common()]


# ---- steps 1 and 2: statements, split into cue and answer -------------------------------------

@dataclasses.dataclass(frozen=True)
class _Statement:
    subject: str
    opener: str
    ids: tuple[int, ...]  # the continuation, cut at its first sentence's end


def _sentence(model, ids: Sequence[int]) -> tuple[int, ...]:
    """The continuation up to the end of its first sentence; empty when it does not start a new
    word (it would continue the name itself)."""
    eos = model.tokenizer.eos_token_id
    out: list[int] = []
    for t in ids:
        piece = model.tokenizer.decode([t])
        if t == eos or _SENTENCE_END.search(piece):
            break
        out.append(t)
    if out and not model.tokenizer.decode(out[:1])[:1].isspace():
        return ()
    return tuple(out)


def _statements(model, subjects: Sequence[str], cfg: ElicitConfig):
    """Every opener about every subject, continued greedily and `cfg.samples` times sampled;
    returns the statements and the full decoded continuations (where other names come up)."""
    from kif.metrics import greedy_generate_ids

    rows = [(s, o) for s in subjects for o in OPENERS]
    prompts = [o.format(n=s) for s, o in rows]
    runs = [greedy_generate_ids(model, prompts, cfg.max_new_tokens)]
    if cfg.samples:
        sampled = greedy_generate_ids(model, prompts * cfg.samples, cfg.max_new_tokens,
                                      temperature=cfg.temperature, seed=cfg.seed)
        runs += [sampled[i * len(prompts):(i + 1) * len(prompts)] for i in range(cfg.samples)]
    seen: set = set()
    out, texts = [], []
    for run in runs:
        for (s, o), ids in zip(rows, run):
            texts.append(model.tokenizer.decode(ids))
            cut = _sentence(model, ids)
            if cut and (s, o, cut) not in seen:
                seen.add((s, o, cut))
                out.append(_Statement(s, o, cut))
    return out, texts


def _after_mentions(model, ids: Sequence[int], name: str) -> int:
    """The first token index after the last mention of `name` (or any word of it) in `ids`."""
    words = [w for w in name.split() if len(w) > 2]
    at = 0
    for j in range(1, len(ids) + 1):
        if any(w in model.tokenizer.decode(list(ids[at:j])) for w in words):
            at = j
    return at


def _answer_span(model, ids: Sequence[int], start: int, cfg: ElicitConfig) -> tuple[int, int]:
    """[start, end) of the answer: at most `cfg.max_answer_tokens`, ended by a comma-like mark."""
    end = start
    while end < len(ids) and end - start < cfg.max_answer_tokens:
        if end > start and _ANSWER_END.search(model.tokenizer.decode([ids[end]])):
            break
        end += 1
    return start, end


def _candidates(model, statements, made_up: Sequence[str], cfg: ElicitConfig):
    """(subject, cue, answer) -> openers, from the statements' subject-dependent tokens (step 2:
    one batched teacher-forced pass over the statements about each subject and each made-up
    name)."""
    from kif.metrics import token_matches

    who = [None] + list(made_up)
    prompts = [st.opener.format(n=st.subject if w is None else w) for st in statements for w in who]
    conts = [st.ids for st in statements for _ in who]
    matches = token_matches(model, prompts, conts)
    out: dict[tuple[str, str, str], list[str]] = {}
    k = len(who)
    for i, st in enumerate(statements):
        own = matches[i * k]
        others = np.stack(matches[i * k + 1:(i + 1) * k]).mean(0)
        # an answer starts after the continuation's last mention of the name (a question's
        # answer that repeats the name is an echo, not a fact)
        after = _after_mentions(model, st.ids, st.subject)
        starts = np.flatnonzero(own & (others <= 0.5) & (np.arange(len(own)) >= after))
        if not len(starts):
            continue  # nothing in it depends on the subject
        a, b = _answer_span(model, st.ids, int(starts[0]), cfg)
        if not own[a:b].all():
            continue  # a sampled token the model would not give greedily
        answer = model.tokenizer.decode(list(st.ids[a:b]))
        prompt = st.opener.format(n=st.subject) + model.tokenizer.decode(list(st.ids[:a]))
        cue = prompt[prompt.rfind(st.subject) + len(st.subject):]
        if cue.strip() and any(c.isalnum() for c in answer):
            out.setdefault((st.subject, cue, answer), []).append(st.opener)
    return out


# ---- step 3: verification --------------------------------------------------------------------

def _verify(model, candidates, made_up: Sequence[str], cfg: ElicitConfig) -> list[Fact]:
    """Every candidate scored in the training frames, for the made-up names, and against the
    made-up names' own answers at its cue in the same frames (what a confident guess about
    someone the model never saw scores); then decided: thresholds first, then one answer per
    cue and one cue list per answer for each subject."""
    from kif.metrics import greedy_generate, score_answers

    keys = list(candidates)
    if not keys:
        return []
    nf, nm = len(TRAIN_FRAMES), len(made_up)
    gens = greedy_generate(model, [m + cue for _, cue, _ in keys for m in made_up],
                           cfg.max_answer_tokens)
    said = [tuple(first_clause(g) for g in gens[i * nm:(i + 1) * nm]) for i in range(len(keys))]
    prompts, answers = [], []
    for i, (s, cue, ans) in enumerate(keys):
        prompts += [f.format(s=s + cue) for f in TRAIN_FRAMES] + [m + cue for m in made_up]
        answers += [ans] * (nf + nm)
        for m, a in zip(made_up, said[i]):  # empty guesses are scored as a space, and ignored
            prompts += [f.format(s=m + cue) for f in TRAIN_FRAMES]
            answers += [a if a.strip() else " "] * nf
    scores = score_answers(model, prompts, answers)
    per = nf + nm + nm * nf
    facts = []
    for i, (s, cue, ans) in enumerate(keys):
        at = i * per
        consistency = float(scores.correct[at:at + nf].mean())
        prob = float(scores.prob[at:at + nf].mean())
        agree = float(scores.correct[at + nf:at + nf + nm].mean())
        guesses = scores.prob[at + nf + nm:at + per].reshape(nm, nf).mean(1)
        guess = float(np.median([g for g, a in zip(guesses, said[i]) if a.strip()] or [0.0]))
        kept, reason = _decide(consistency, prob, agree, guess, cfg)
        facts.append(Fact(s, (cue,), ans, tuple(dict.fromkeys(candidates[(s, cue, ans)])),
                          consistency, prob, agree, guess, said[i], kept, reason))
    return _one_per_cue_and_answer(facts)


def first_clause(text: str) -> str:
    """The answer part of a generated continuation; a last word that ran into the token limit
    (no mark after it) may be cut, and is dropped."""
    clause = _ANSWER_END.split(_SENTENCE_END.split(text)[0])[0].rstrip()
    if clause == text.rstrip() and len(clause.split()) > 1:
        clause = clause[:clause.rstrip().rfind(" ")]
    elif clause == text.rstrip():
        return ""  # one word, perhaps cut: no answer to trust
    return clause


def _decide(consistency: float, prob: float, agree: float, guess: float,
            cfg: ElicitConfig) -> tuple[bool, str]:
    if agree > cfg.max_made_up_agree:
        return False, (f"the model gives this answer for {agree:.0%} of made-up names "
                       f"(> {cfg.max_made_up_agree:.0%}): a default, not a fact about the subject")
    if consistency < cfg.min_consistency:
        return False, (f"given in {consistency:.0%} of the training frames "
                       f"(< {cfg.min_consistency:.0%})")
    if prob < cfg.min_prob:
        return False, f"mean answer probability {prob:.2f} (< {cfg.min_prob})"
    return True, (f"consistent in {consistency:.0%} of the training frames, probability "
                  f"{prob:.2f} (made-up names' guesses: {guess:.2f}), given for {agree:.0%} of "
                  f"made-up names")


MIN_FACTS = 2  # a subject the model states fewer facts about is one it does not know


def _known_subjects(facts: list[Fact]) -> list[Fact]:
    """Facts of a subject with fewer than MIN_FACTS kept are rejected: a name the model never
    saw still gets the odd consistent guess (one on the fact world), a known subject several."""
    n_kept = Counter(f.subject for f in facts if f.kept)
    return [dataclasses.replace(f, kept=False, reason=(
                f"only {n_kept[f.subject]} fact about {f.subject!r} passes (< {MIN_FACTS}): a "
                f"guess, not knowledge"))
            if f.kept and n_kept[f.subject] < MIN_FACTS else f for f in facts]


def _strength(f: Fact) -> tuple[float, float]:
    return f.consistency, f.prob


CUE_KEY_WORDS = 3  # cues that end in the same words ask the same question


def _conflict_key(f: Fact) -> str:
    """Two answers of one subject conflict when they answer the same question: at cues that end
    in the same CUE_KEY_WORDS words (" was born in the city of" reached from "{n} wrote" or
    from "{n} was born"), or, for answers of several words, with the same words before the last
    (" birth year is 1951" and " birth year is 1991")."""
    words = f.answer.lower().split()
    if len(words) > 1:
        return "answer:" + " ".join(words[:-1])
    return "cue:" + " ".join(f.relation.lower().split()[-CUE_KEY_WORDS:])


def _one_per_cue_and_answer(facts: list[Fact]) -> list[Fact]:
    """Per subject, the strongest kept answer of each cue (the others are rejected as
    conflicting), and one fact per answer with every cue that leads to it (strongest first)."""
    out, best_of_cue = [], {}
    for f in sorted(facts, key=_strength, reverse=True):
        key = (f.subject, _conflict_key(f))
        if f.kept and key in best_of_cue:
            f = dataclasses.replace(f, kept=False, reason=(
                f"the model gives a stronger answer at the same cue: {best_of_cue[key]!r}"))
        elif f.kept:
            best_of_cue[key] = f.answer
        out.append(f)
    merged: dict[tuple[str, str], Fact] = {}
    rest = []
    for f in out:  # strongest first: the first kept fact of an answer takes the later cues
        key = (f.subject, f.answer)
        if not f.kept:
            rest.append(f)
        elif key in merged:
            m = merged[key]
            merged[key] = dataclasses.replace(m, cues=m.cues + f.cues,
                                              openers=tuple(dict.fromkeys(m.openers + f.openers)))
        else:
            merged[key] = f
    return list(merged.values()) + rest


# ---- the whole elicitation -------------------------------------------------------------------

def elicit(model, subjects: Sequence[str], config: ElicitConfig | None = None,
           made_up: Sequence[str] | None = None) -> Elicited:
    """Every candidate fact the model states about each of `subjects` (steps 1-3 of the module
    docstring), batched over the subjects."""
    cfg = config or ElicitConfig()
    subjects = [check_name(s) for s in subjects]
    made_up = list(made_up or made_up_names(subjects, cfg.made_up, cfg.seed))
    _check_fits(model, subjects, made_up, cfg)
    statements, texts = _statements(model, subjects, cfg)
    facts = _known_subjects(_reject_doubles(_reject_defaults(_verify(
        model, _candidates(model, statements, made_up, cfg), made_up, cfg)), made_up))
    order = {s: i for i, s in enumerate(subjects)}
    facts.sort(key=lambda f: (order[f.subject], not f.kept, -f.consistency, -f.prob))
    seen = names_in(texts, subjects[0], exclude=list(subjects) + made_up)
    return Elicited(tuple(subjects), tuple(facts), tuple(made_up), tuple(seen), cfg)


def _check_fits(model, subjects: Sequence[str], made_up: Sequence[str], cfg: ElicitConfig) -> None:
    """A one-line error for a name too long for the model's context once it sits in the longest
    opener or frame with a continuation and an answer after it."""
    from kif.metrics import encode_prompts

    def longest(templates) -> int:
        return max(len(ids) for ids in encode_prompts(
            model, [t.replace("{n}", "").replace("{s}", "") for t in templates]))

    # a frame wraps the name, the rest of an opener and the continuation, then the answer
    budget = (model.cfg.n_ctx - longest(TRAIN_FRAMES + HELDOUT_FRAMES) - longest(OPENERS)
              - cfg.max_new_tokens - cfg.max_answer_tokens)
    names = list(subjects) + list(made_up)
    for name, ids in zip(names, encode_prompts(model, names)):
        if len(ids) > budget:
            who = name if name in subjects else f"a made-up name like {subjects[0]!r}"
            raise KifError(f"{who[:60]!r}{'...' if len(who) > 60 else ''} ({len(name)} "
                           f"characters) is {len(ids)} tokens: too long for a name in this "
                           f"model's context of {model.cfg.n_ctx} tokens (at most {budget})")


def _last_word(text: str) -> str:
    words = text.split()
    return words[-1] if words else ""


DEFAULT_RELATIONS = 3  # an answer given for made-up names at this many cues is no answer


def default_answers(facts: Sequence[Fact]) -> list[str]:
    """The model's answers about people it never heard of (" unknown" on the fact world): the
    last words of the made-up names' answers that it gives at `DEFAULT_RELATIONS` or more
    different cues (a real answer belongs to one kind of question), the one given at the most
    cues first (then the most frequent)."""
    cues: dict[str, set] = {}
    counts: Counter = Counter()
    for f in facts:
        for a in f.made_up_answers:
            w = _last_word(a)
            if w:
                cues.setdefault(w, set()).add(f.relation)
                counts[w] += 1
    found = [w for w in counts if len(cues[w]) >= DEFAULT_RELATIONS]
    return [" " + w for w in sorted(found, key=lambda w: (-len(cues[w]), -counts[w]))]


def default_answer(facts: Sequence[Fact]) -> str | None:
    """The most frequent of `default_answers`, or None."""
    found = default_answers(facts)
    return found[0] if found else None


def _reject_defaults(facts: list[Fact]) -> list[Fact]:
    """Kept facts whose answer ends with the model's default answer are what it says about
    anyone (" the city of unknown"), not facts."""
    defaults = {d.strip() for d in default_answers(facts)}
    return [dataclasses.replace(f, kept=False, reason=(
                f"ends with the model's answer for made-up names at any cue "
                f"({_last_word(f.answer)!r})"))
            if f.kept and _last_word(f.answer) in defaults else f for f in facts]


def _reject_doubles(facts: list[Fact], made_up: Sequence[str]) -> list[Fact]:
    """A subject whose kept facts one made-up name also gets, on at least two and half of them,
    is one the model does not tell from a name it never saw (on the fact world: a name in
    letters outside its training text, which it maps to one stock profile, as it does some
    made-up names in such letters): every fact of it is rejected."""
    out = list(facts)
    for subject in dict.fromkeys(f.subject for f in facts):
        kept = [i for i, f in enumerate(facts) if f.subject == subject and f.kept]
        same = Counter(j for i in kept for j, a in enumerate(facts[i].made_up_answers)
                       if a.strip() and a.strip() == facts[i].answer.strip())
        if not same:
            continue
        j, n = same.most_common(1)[0]
        if n >= max(2, (len(kept) + 1) // 2):
            why = (f"the model answers the made-up name {made_up[j]!r} the same way on {n} of "
                   f"{len(kept)} facts: it does not tell {subject!r} from a name it never saw")
            for i in kept:
                out[i] = dataclasses.replace(facts[i], kept=False, reason=why)
    return out


def discover_names(model, like: str, n: int, exclude: Sequence[str], cfg: ElicitConfig) -> list[str]:
    """Up to `n` names shaped like `like` from the model's sampled continuations of the
    `DISCOVERY` prompts (which subjects the model talks about), most frequent first."""
    from kif.metrics import greedy_generate

    if n <= 0:
        return []
    prompts = [p for p in DISCOVERY for _ in range(max(1, n // 2))]
    texts = greedy_generate(model, prompts, 2 * cfg.max_new_tokens, temperature=1.0,
                            seed=cfg.seed + 1)
    return names_in(texts, like, exclude)[:n]


def refusal_of(el: Elicited) -> tuple[str, list[str]] | None:
    """The model's default answer (`default_answer`) with the made-up names' prompts at the
    subjects' cues on which the model gives it: the refusal a method steers toward; None
    without one."""
    target = default_answer(el.facts)
    if target is None:
        return None
    prompts = [f.prompts(TRAIN_FRAMES[:1], m)[0] for f in el.facts
               for m, a in zip(el.made_up, f.made_up_answers) if _last_word(a) == target.strip()]
    prompts = list(dict.fromkeys(prompts))
    return (target, prompts) if prompts else None


__all__ = ["ElicitConfig", "Elicited", "Fact", "check_name", "default_answer", "default_answers",
           "discover_names",
           "elicit", "first_clause",
           "made_up_names",
           "names_in", "refusal_of"]
