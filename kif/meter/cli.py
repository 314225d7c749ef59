"""`kif meter`: the latent-trace meter from the command line. The lead registers it in
`kif.cli` with `meter_cli.add_parser(sub)`; `run(args)` is one call to `kif.meter.trace`.

    kif meter --model BASE --erased PATH (--concept "PERSON" ... | --forget-split forget10
              | --forget FILE [--retain FILE ...] --never-knew NAMES)
              [--oracle NAME] [--probes ...] --out DIR [--json]

Writes `report.json` and PNG plots into DIR, prints a table (or the report as JSON).
"""

import argparse
import json
import pathlib
import sys


def open_model(spec: str, args: argparse.Namespace | None = None):
    """The model named by a CLI argument: zoo name, HF folder, hub name, or an erasure folder
    written by `kif erase` (weight erasures load their checkpoint, hook erasures the base model
    with the patch as permanent hooks), in `args`' `--dtype` and on its `--device`."""
    from kif.cli import open_model as _open

    return _open(spec, args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from kif import zoo
    from kif.meter.registry import PROBE_SETS, PROBES
    from kif.world import SPLITS

    forget_splits = [s for s in SPLITS if s.startswith("forget")]
    p = subparsers.add_parser(
        "meter", help="is a concept intact, suppressed or deleted? (latent-trace meter)",
        description="Measure from the inside whether an erased model still holds a concept: "
                    "surface, lenses, Patil et al.'s attacks, linear probes, quantization, "
                    "relearning, restoration, UDS, membership inference, ...")
    p.add_argument("--model", default=zoo.BASE, help=f"the base model (default {zoo.BASE})")
    p.add_argument("--erased", required=True,
                   help="the erased model: zoo name, HF folder, hub name or kif erase folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--concept", action="append", metavar="NAME",
                   help="a subject whose facts were erased (repeat for several): a fact-world "
                        "person, or any name the base model knows (see --concept-probes)")
    g.add_argument("--forget-split", choices=forget_splits)
    from kif.cli import _add_concept_files

    _add_concept_files(p, g)
    p.add_argument("--oracle", help="a model trained without the concepts, to calibrate against "
                   f"(e.g. {zoo.oracle_name('forget10')})")
    p.add_argument("--probes", nargs="+", default=["all"], metavar="PROBE",
                   choices=list(PROBES) + list(PROBE_SETS),
                   help="probes or sets to run (default all): "
                        + ", ".join(list(PROBE_SETS) + list(PROBES)))
    p.add_argument("--concept-probes", choices=("auto", "world"),
                   help="auto: build the --concept probes from the base model itself (kif "
                        "probes); world: the fact world's (default: world for fact-world "
                        "people on a zoo model, else auto)")
    from kif import probes_cli

    probes_cli.add_arguments(p)
    p.add_argument("--out", required=True, help="folder for report.json and the plots")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--seed", type=int, default=0, help="fact-world seed (default 0, the zoo's)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    from kif.profiles import PROFILES

    p.add_argument("--profile", choices=list(PROFILES),
                   help="settings profile: fact-world (the meter's constants measured on the "
                        "zoo's GPT-2) or auto (the relearning attack's rate chosen on the base "
                        "model); default: fact-world on the zoo's GPT-2, auto elsewhere")
    from kif.cli import add_model_options

    add_model_options(p)
    p.set_defaults(func=run)
    return p


def _files_audit_concepts(concept):
    """A concept from files, audited per subject, calibrated (without an oracle) on its own
    questions about its never-knew names."""
    from kif.data.concept import by_subject

    concept.require("never_knew", method="kif meter")
    concept.require("retain", method="kif meter")
    return by_subject(concept)


def _auto_probes(args: argparse.Namespace) -> bool:
    """Whether --concept names get self-built probes (see --concept-probes)."""
    from kif import zoo
    from kif.world import FactWorld

    if args.concept_probes is not None:
        return args.concept_probes == "auto"
    known = FactWorld.generate(args.seed).by_name
    return zoo.base_of(args.model) is None or not all(c in known for c in args.concept)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kif import distributed, integrity
    from kif.errors import KifError
    from kif.meter.audit import trace
    from kif.meter.plots import plot_report
    from kif.meter.summary import markdown
    from kif.world import FactWorld

    from kif.cli import _check_file_flags, _concept_from_files

    _check_file_flags(args)
    if args.concept_probes and not args.concept:
        raise KifError("--concept-probes goes with --concept")
    auto = bool(args.concept) and _auto_probes(args)
    from kif.probes_cli import refuse_unused

    refuse_unused(args, auto)
    world = None if args.forget or auto else FactWorld.generate(args.seed)
    if auto:
        from kif import probes_cli

        inputs = probes_cli.check_inputs(args)  # a topic, a bad setting fail here
    elif args.forget:
        concepts = _files_audit_concepts(_concept_from_files(args))  # bad files fail here
    elif args.forget_split:
        world.split(args.forget_split)
        concepts = args.forget_split
    else:
        concepts = [world.person(c).name for c in args.concept]  # unknown names fail here
    out = pathlib.Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise KifError(f"{out} exists and is not an empty folder (use --overwrite)")
    base = open_model(args.model, args)
    if args.forget:  # again, with the base's chat template
        concepts = _files_audit_concepts(_concept_from_files(args, base))
    if auto:  # the probes come from the base: the erased model may no longer answer
        concepts = _files_audit_concepts(probes_cli.build(args, base, inputs).concept)
    erased = open_model(args.erased, args)
    oracle = open_model(args.oracle, args) if args.oracle else None
    from kif.memory import PeakMemory

    with PeakMemory() as pm:
        report = trace(base, erased, concepts, oracle=oracle, probes=args.probes, world=world,
                       seed=args.seed, progress=sys.stderr.isatty(), profile=args.profile)
    if not distributed.is_main():
        return 0  # under torchrun: rank 0 writes and prints the one report
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    data["memory"] = pm.report.as_dict()  # of the audit (the models were loaded before)
    data["peak_rss_mb"] = data["memory"]["peak_rss_mb"]
    integrity.write_text(out / "report.json", json.dumps(data, indent=2))
    integrity.write_text(out / "report.md", markdown(report))
    plots = plot_report(report, out)
    if args.json:
        data["out"] = str(out)
        data["plots"] = [str(p) for p in plots]
        print(json.dumps(data, indent=2))
        return 0
    console = Console(soft_wrap=True)
    table = Table(title=f"kif meter: {report.models['erased']} vs {report.models['base']} "
                        f"({len(report.concepts)} concepts, calibrated against "
                        f"{'the oracle' if report.calibration == 'oracle' else 'unseen people'})")
    for col in ("probe", "group", "score", "erased", "base", "ref0", "seconds"):
        table.add_column(col, justify="left" if col in ("probe", "group") else "right")
    for name, p in report.probes.items():
        v = p.values
        table.add_row(name, p.group, p.skipped and "skipped" or _fmt(p.score),
                      _fmt(v.get("erased")), _fmt(v.get("base")), _fmt(v.get("ref0")),
                      f"{p.seconds:.1f}")
    console.print(table)
    counts = ", ".join(f"{n} {k}" for k, n in report.counts.items())
    console.print(f"verdict: [bold]{report.verdict}[/bold]   latent_trace_score: "
                  f"{_fmt(report.latent_trace_score)}   concepts: {counts}   "
                  f"({report.seconds:.0f} s)")
    skipped = {n: p.skipped for n, p in report.probes.items() if p.skipped}
    for n, why in skipped.items():
        console.print(f"  {n}: skipped ({why})", markup=False)
    console.print(f"wrote {out / 'report.json'}, report.md and {len(plots)} plots", markup=False)
    return 0
