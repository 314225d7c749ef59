"""`kif probes` and `kif erase --probes auto`: a concept's probes built from the model itself,
given only names (`kif.data.selfbuilt`)."""

import argparse
import dataclasses
import json
import pathlib
from typing import Any

from kif.errors import KifError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options that `kif probes` and `kif erase --probes auto` share."""
    p.add_argument("--neighbours", nargs="+", metavar="NAME",
                   help="subjects to keep (default: names the model's own continuations bring "
                        "up next to the target that it states facts about)")
    p.add_argument("--retain-corpus", metavar="FILE",
                   help="retain texts for key statistics and KL (.txt, or JSON/JSONL of "
                        "{'text': ...}; default: kif's general corpus)")
    p.add_argument("--probe-set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="elicitation settings (kif.data.elicit.ElicitConfig), e.g. "
                        "--probe-set min_consistency=0.6 samples=4")


def refuse_unused(args: argparse.Namespace, auto: bool) -> None:
    """One-line errors for options that the chosen probes would ignore."""
    if auto:
        for flag in ("retain", "neighbour", "never_knew"):
            if getattr(args, flag, None) is not None:
                raise KifError(f"--{flag.replace('_', '-')} goes with --forget (with self-built "
                               f"probes: --neighbours, --retain-corpus)")
    else:
        for flag in ("neighbours", "retain_corpus", "probe_set"):
            if getattr(args, flag, None) is not None:
                raise KifError(f"--{flag.replace('_', '-')} goes with self-built probes")


def add_parser(sub, model_default: str) -> None:
    from kif.cli import add_model_options

    p = sub.add_parser("probes", help="build a concept's probes from the model itself, given "
                       "only names (self-built probes, for review and --forget FILE)")
    p.add_argument("--model", default=model_default,
                   help="zoo name, HF checkpoint folder, hub name")
    p.add_argument("--concept", nargs="+", action="extend", required=True, metavar="NAME",
                   help="named subjects: a person, a place, a work, an organisation")
    p.add_argument("--out", required=True, metavar="FILE.jsonl",
                   help="new kif JSONL file (the made-up names go to FILE.never-knew.txt)")
    p.add_argument("--refusal", metavar="TEXT", help="the refusal target (default: the "
                   "model's own answer for made-up names, when it has one)")
    add_arguments(p)
    p.add_argument("--json", action="store_true")
    add_model_options(p)
    p.set_defaults(func=run_probes)


def elicit_config(args: argparse.Namespace):
    from kif.cli import _parse_settings
    from kif.data.elicit import ElicitConfig

    settings = _parse_settings(getattr(args, "probe_set", None))
    fields = {f for f in ElicitConfig.__dataclass_fields__}
    bad = sorted(set(settings) - fields)
    if bad:
        raise KifError(f"--probe-set: no setting {bad[0]!r} (settings: {', '.join(sorted(fields))})")
    return ElicitConfig(**settings)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What `kif probes` and `--probes auto` read from the command line, checked."""

    names: list[str]
    config: Any  # kif.data.elicit.ElicitConfig
    corpus: list[str]


def check_inputs(args: argparse.Namespace) -> Inputs:
    """The names, the settings and the retain corpus, checked before a model is loaded."""
    from kif.data.elicit import check_name
    from kif.data.formats import read_text_corpus
    from kif.data.selfbuilt import GENERAL_CORPUS

    names = [check_name(n) for n in args.concept]
    return Inputs(names, elicit_config(args),
                  read_text_corpus(pathlib.Path(args.retain_corpus or GENERAL_CORPUS)))


def build(args: argparse.Namespace, model, inputs: Inputs):
    from kif.data.selfbuilt import build as build_concept

    return build_concept(model, inputs.names, neighbours=args.neighbours, config=inputs.config,
                         corpus=inputs.corpus, refusal=args.refusal)


def run_probes(args: argparse.Namespace) -> int:
    from kif.cli import _out, open_model
    from kif.data.selfbuilt import summary, write_probes

    out = pathlib.Path(args.out)
    if out.exists():
        raise KifError(f"{out} exists: kif probes writes a new file (move it or pick another)")
    if out.suffix not in (".jsonl", ".json"):
        raise KifError(f"--out {out}: the probes file is kif JSONL, name it FILE.jsonl")
    inputs = check_inputs(args)
    model = open_model(args.model, args)
    sb = build(args, model, inputs)
    path, never = write_probes(sb, out)
    s = {**summary(sb), "out": str(path), "never_knew_file": str(never)}
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    _print_summary(s, _out())
    return 0


def _print_summary(s: dict, console) -> None:
    from rich.table import Table

    for name, t in s["targets"].items():
        table = Table(title=f"{name}: {len(t['kept'])} facts kept, {t['rejected']} candidates "
                            f"rejected")
        for col in ("cue", "answer", "consistency", "probability"):
            table.add_column(col)
        for f in t["kept"]:
            table.add_row(f["relation"], f["answer"], f"{f['consistency']:.2f}",
                          f"{f['prob']:.2f}")
        console.print(table)
    console.print(f"neighbours kept: {', '.join(s['neighbours']) or 'none'}; refusal: "
                  f"{s['refusal']!r}; wrote {s['out']} and {s['never_knew_file']}")
    from kif.data.selfbuilt import GENERAL_CORPUS

    console.print(f"review it (flip \"keep\"), then: kif erase --forget {s['out']} "
                  f"--never-knew {s['never_knew_file']} --retain {GENERAL_CORPUS} "
                  f"--out DIR")
