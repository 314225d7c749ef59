"""The `kif` command line: a thin layer that parses, calls the Python API and prints.

Every subcommand is one call into the library; `main(argv) -> int` so tests call it directly.
Errors kif expects (bad names, bad files) print one line `kif: error: ...` and return 2.
"""

import argparse
import json
import logging
import math
import pathlib
import sys
import time
from typing import Sequence

from rich.console import Console
from rich.table import Table

from kif.errors import KifError

_EXPECTED_ERRORS: tuple[type[BaseException], ...] = (KifError,)


def _out() -> Console:
    return Console(soft_wrap=True)


def _err(msg: str) -> int:
    Console(stderr=True, soft_wrap=True, highlight=False).print(f"kif: error: {msg}", markup=False)
    return 2


# ---- kif eval ----------------------------------------------------------------------------------

def _cmd_eval(args: argparse.Namespace) -> int:
    _check_file_flags(args)
    if args.forget:
        return _cmd_eval_files(args)
    from kif.evaluation import evaluate
    from kif.world import FactWorld

    from kif.erasure.registry import resolve_concepts

    world = FactWorld.generate(args.seed)
    forget = args.concept or args.forget_split
    # refuse an unknown split or person before loading anything
    resolve_concepts(world, forget)
    model = open_model(args.model, args)
    oracle = open_model(args.oracle, args) if args.oracle else None
    report = evaluate(model, world, forget, oracle=oracle)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    table = Table(title=f"kif eval: {report.model} on {report.forget_split}", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("forget_acc", "forget_paraphrase_acc", "forget_novel_acc", "retain_acc",
                "retain_paraphrase_acc", "retain_novel_acc", "neighbour_acc",
                "neighbour_novel_acc", "shared_acc", "shared_paraphrase_acc", "shared_novel_acc",
                "unknown_acc", "model_utility", "forget_truth_ratio_median"):
        table.add_row(key, f"{getattr(report, key):.3f}")
    if report.forget_quality is not None:
        table.add_row(f"forget_quality (vs {report.oracle})", f"{report.forget_quality:.3g}")
        table.add_row("forget_quality_fine (every phrasing)", f"{report.forget_quality_fine:.3g}")
        table.add_row("forget_ks_fine (KS distance)", f"{report.forget_ks_fine:.3f}")
    table.add_row("seconds", f"{report.seconds:.1f}")
    _out().print(table)
    return 0


def _cmd_eval_files(args: argparse.Namespace) -> int:
    from kif.evaluation import evaluate_concept

    _concept_from_files(args)  # a bad file fails before any model is loaded
    model = open_model(args.model, args)
    concept = _concept_from_files(args, model)
    oracle = open_model(args.oracle, args) if args.oracle else None
    report = evaluate_concept(model, concept, oracle=oracle)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_metrics(f"kif eval: {report['model']} on {concept.name}", report)
    return 0


def _print_metrics(title: str, report: dict) -> None:
    table = Table(title=title, show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4g}")
    _out().print(table)


# ---- concepts from files -----------------------------------------------------------------------

def _add_concept_files(p: argparse.ArgumentParser, group) -> None:
    """The file alternative to --concept / --forget-split (`kif.data.formats.load_concept`)."""
    group.add_argument("--forget", metavar="FILE", help="forget probes: kif JSONL or a TOFU QA "
                       "file (JSON / JSONL)")
    p.add_argument("--retain", nargs="+", metavar="FILE", help="with --forget: retain probes and "
                   "corpora (kif JSONL, TOFU, {'text': ...} JSONL or .txt), and refusal rows")
    p.add_argument("--neighbour", metavar="FILE", help="with --forget: neighbour probes")
    p.add_argument("--refusal", metavar="TEXT", help="with --forget: the refusal target, e.g. "
                   "' unknown' (default: the answer of the refusal rows)")
    p.add_argument("--never-knew", metavar="FILE", help="with --forget: made-up names, one per "
                   "line, for the never-knew reference")
    p.add_argument("--chat-template", choices=("auto", "none"), default="auto",
                   help="wrap questions in the tokenizer's chat template when it has one")


def _check_file_flags(args: argparse.Namespace) -> None:
    for flag in ("retain", "neighbour", "refusal", "never_knew"):
        if getattr(args, flag, None) is not None and not args.forget:
            raise KifError(f"--{flag.replace('_', '-')} goes with --forget")


def _concept_from_files(args: argparse.Namespace, model=None):
    """The concept of --forget/--retain/...; with `model`, its tokenizer's chat template
    applied (`--chat-template auto`)."""
    from kif.data.formats import load_concept

    _check_file_flags(args)
    return load_concept(args.forget, args.retain, args.neighbour, refusal=args.refusal,
                        never_knew=args.never_knew, chat_template=args.chat_template,
                        tokenizer=getattr(model, "tokenizer", None))


def _cmd_data_export(args: argparse.Namespace) -> int:
    from kif.data.export import export_world
    from kif.world import FactWorld

    out = export_world(FactWorld.generate(args.seed), args.forget_split, args.format,
                       out_dir=args.out)
    files = sorted(p.name for p in out.iterdir())
    if args.json:
        print(json.dumps({"out": str(out), "files": files}))
    else:
        _out().print(f"wrote {out}: {', '.join(files)}")
    return 0


# ---- kif zoo -----------------------------------------------------------------------------------

def _cmd_zoo_list(args: argparse.Namespace) -> int:
    from kif import zoo

    rows = []
    for name, entry in zoo.ENTRIES.items():
        size = sum(f.stat().st_size for f in entry.path.glob("*")) if entry.path.is_dir() else 0
        card = zoo.card(name)
        rows.append({"name": name, "description": entry.description, "built": zoo.is_built(name),
                     "forget_split": entry.forget_split, "path": str(entry.path),
                     "megabytes": round(size / 2**20, 2),
                     "train_seconds": card.get("train_seconds")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="kif zoo")
    for col in ("name", "built", "MB", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "yes" if r["built"] else "no", f"{r['megabytes']:.1f}",
                      r["description"])
    _out().print(table)
    return 0


SAES = "fact-world-saes"  # `kif zoo build --only fact-world-saes`: the shipped SAEs


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    import dataclasses
    import pathlib

    from kif import zoo
    from kif.zoo.build import TrainConfig, build

    if args.arch and args.only:
        raise KifError("give --arch or --only, not both")
    if args.arch:  # one architecture's models (the SAEs read GPT-2's residual stream)
        names = [n for n, e in zoo.ENTRIES.items() if e.arch == args.arch]
        names += [SAES] if args.arch == "gpt2" else []
    else:
        names = args.only or [*zoo.ENTRIES, SAES]
    for n in names:
        if n not in zoo.ENTRIES and n != SAES:
            raise KifError(f"unknown zoo model {n!r} (choose from "
                           f"{', '.join([*zoo.ENTRIES, SAES])})")
    cfg = TrainConfig()
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.train_seed is not None:
        if not args.out:  # the installed zoo keeps the shipped recipe
            raise KifError("--train-seed builds another model than the shipped one: give --out")
        cfg = dataclasses.replace(cfg, train_seed=args.train_seed)
    out_root = pathlib.Path(args.out) if args.out else None
    t0 = time.perf_counter()
    timings = build([n for n in names if n != SAES], out_root, cfg, show_progress=not args.json)
    if SAES in names:  # after the base model: the SAEs read its residual stream
        from kif import models
        from kif.zoo.build_saes import SAE_DIR, build_saes

        t1 = time.perf_counter()
        base = models.load((out_root / zoo.BASE) if out_root else zoo.BASE)
        cards = build_saes(out_root / "saes" if out_root else SAE_DIR, model=base)
        timings[SAES] = time.perf_counter() - t1
        for hook, card in cards.items():
            log_line = (f"SAE {hook}: explained variance {card['explained_variance']:.3f}, "
                        f"L0 {card['l0']:.1f} (held-out text)")
            if not args.json:
                _out().print(log_line)
    total = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"seconds": round(total, 1),
                          "models": {k: round(v, 1) for k, v in timings.items()}}, indent=2))
    else:
        for k, v in timings.items():
            _out().print(f"built {k} in {v:.0f} s")
        _out().print(f"zoo built in {total / 60:.1f} min ({total:.0f} s)")
    return 0


# ---- kif signatures / kif bench signatures ------------------------------------------------------

def _cmd_signatures(args: argparse.Namespace) -> int:
    import pathlib

    from kif import models
    from kif.signatures.registry import extract
    from kif.signatures.plots import plot_signature
    from kif.world import FactWorld, world_concept

    # refuses unknown people and bad files before any work
    _check_file_flags(args)
    concept = (_concept_from_files(args) if args.forget
               else world_concept(FactWorld.generate(args.seed), args.concept))
    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise KifError(f"{out} exists and is not empty (use --overwrite)")
    settings = _sae_setting(args.sae, args.kind)
    model = models.load(args.model, **load_options(args))
    if args.forget:
        concept = _concept_from_files(args, model)
    t0 = time.perf_counter()
    sig = extract(model, concept, kind=args.kind, **settings)
    seconds = time.perf_counter() - t0
    sig.save(out)
    plots = plot_signature(sig, out)
    summary = {"concept": sig.concept, "kind": sig.kind, "model": sig.model_name,
               "components": len(sig), "hooks": list(sig.hooks), "seconds": round(seconds, 2),
               "top": [{"hook": sig.component_hooks[i], "score": float(sig.scores[i]),
                        **({"index": int(sig.indices[i, 1])} if sig.indices is not None else {})}
                       for i in range(min(10, len(sig)))],
               "info": sig.info, "out": str(out), "plots": [str(p) for p in plots]}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    table = Table(title=f"{sig.kind} signature of {sig.concept} ({seconds:.1f} s)")
    for col in ("#", "hook", "index", "score"):
        table.add_column(col)
    for i, row in enumerate(summary["top"]):
        table.add_row(str(i), row["hook"], str(row.get("index", "")), f"{row['score']:.4g}")
    _out().print(table)
    _out().print(f"wrote {out}/signature.json, signature.safetensors and {len(plots)} plots")
    return 0


def _sae_setting(spec: str | None, kind: str) -> dict:
    """`--sae FOLDER | RELEASE/ID` as the sae-features extractor's `sae` setting. The SAE is
    loaded here, before the model (kif keeps it loaded for the extractor), so that an unknown
    release or a file missing from the HF cache fails before a large model is read."""
    if spec is None:
        return {}
    from kif.signatures.sae_features import KIND, load_sae, parse_sae_spec

    if kind != KIND:
        raise KifError(f"--sae goes with --kind {KIND}")
    ref = parse_sae_spec(spec)
    load_sae(ref)
    return {"sae": ref}


def _cmd_bench_signatures(args: argparse.Namespace) -> int:
    from kif import models
    from kif.signatures.registry import KIND_MODULES
    from kif.signatures.bench import bench_people, causality, default_k, sae_loader, unit_speeds
    from kif.world import FactWorld

    world = FactWorld.generate(args.seed)
    model = models.load(args.model, **load_options(args))
    people = bench_people(world, args.concepts, args.people_seed)
    if args.unit_speed:  # the per-prompt / per-fact figures, not the causality table
        r = {k: round(v, 4) for k, v in unit_speeds(model, world, people).items()}
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            _out().print(f"causal tracing, one prompt (all layers x tokens x 3 kinds): "
                         f"{r['causal_trace_prompt_seconds']:.2f} s (median of "
                         f"{r['causal_trace_prompts']}); knowledge neurons, one fact: "
                         f"{r['knowledge_neurons_fact_seconds']:.2f} s (median of "
                         f"{r['knowledge_neurons_facts']})")
        return 0
    results, rows = {}, {}
    for kind in args.kinds or list(KIND_MODULES):
        k = args.k if args.k is not None else default_k(kind)
        r = rows[kind] = causality(model, world, kind, people, k=k, sae_loader=sae_loader)
        results[kind] = {key: (round(v, 4) if isinstance(v, float) else v)
                         for key, v in r.to_dict().items() if key != "per_person"}
        if args.verbose_people:
            results[kind]["per_person"] = r.per_person
    if args.record:
        from kif import results as results_files
        from kif.signatures.bench import summary_row

        results_files.write(args.record, args.argv, people_seed=args.people_seed,
                            rows=[summary_row(results[kind], r) for kind, r in rows.items()])
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    table = Table(title=f"signature causality on {len(people)} people of {args.model}")
    for col in ("kind", "k", "concept_drop", "random_drop", "collateral_drop", "s/person"):
        table.add_column(col, justify="right")
    for kind, r in results.items():
        table.add_row(kind, str(r["k"]), f"{r['concept_drop']:.3f}", f"{r['random_drop']:.3f}",
                      f"{r['collateral_drop']:.3f}", f"{r['seconds']:.1f}")
    _out().print(table)
    return 0


def _cmd_bench_stamp(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from kif.erasure.bench import bench_stamp

    dtype = {"fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    rows = [bench_stamp(m, rank=args.rank, lam=args.lam, dtype=dtype) for m in args.m]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    table = Table(title=f"STAMP-LR (rank {args.rank}) vs full ridge solve, synthetic keys")
    for col in ("m", "lam", "full s", "low-rank s", "speed-up", "dW rel. error", "edit error"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.m), f"{r.lam:.3g}", f"{r.full_seconds:.2f}",
                      f"{r.lowrank_seconds:.3f}", f"{r.speedup:.1f}x", f"{r.rel_error:.2e}",
                      f"{r.edit_error:.2e}")
    _out().print(table)
    return 0


def _record_and_json(args: argparse.Namespace, r: dict) -> bool:
    """A bench's --record and --json: True when the JSON was printed (nothing else to print)."""
    if args.record:
        from kif import results

        results.write(args.record, args.argv, **r)
    if args.json:
        print(json.dumps(r, indent=2))
    return bool(args.json)


def _cmd_bench_probes(args: argparse.Namespace) -> int:
    from kif import bench_probes
    from kif.world import FactWorld

    world = FactWorld.generate(args.seed)
    if not 1 <= args.people <= len(world.split("retain")) or not 0 <= args.erase <= 10:
        raise KifError("--people: 1 to the retain split's size; --erase: 0 to 10")
    model = open_model(args.model, args)
    oracle = open_model(args.oracle, args)
    r = bench_probes.run(model, oracle, world, args.people, args.erase, args.methods,
                         progress=not args.json)
    if _record_and_json(args, r):
        return 0
    s = r["summary"]
    _out().print(f"elicitation: {s['people_with_4_of_6']}/{s['people']} people with at least 4 "
                 f"of 6 facts, {s['people_without_false_facts']}/{s['people']} without a false "
                 f"fact (mean {s['facts_found_mean']:.2f} facts found)")
    for m in args.methods if args.erase else ():
        _out().print(f"erase by name, {m}: forget target met {s[m]['forget_met']}/"
                     f"{s[m]['erasures']}, retain target met {s[m]['retain_met']}/"
                     f"{s[m]['erasures']}")
    return 0


def _cmd_bench_meter(args: argparse.Namespace) -> int:
    from kif.meter import meta
    from kif.meter.registry import resolve

    from kif.meter.registry import PROBES

    # an unknown probe, a probe set the score cannot read, a bad number: all before a load
    if not any(PROBES[n].group == "latent" for n in resolve(args.probes)):
        raise KifError("--probes: latent_trace_score reads the latent probes; choose at least "
                       "one (e.g. --probes latent)")
    lrs = meta.LRS if args.lrs is None else tuple(args.lrs)
    strengths = meta.STRENGTHS if args.strengths is None else tuple(args.strengths)
    if not all(math.isfinite(x) and x > 0 for x in lrs + strengths):
        raise KifError("--lrs and --strengths must be positive numbers")
    r = meta.run(args.model, args.forget_split, probes=args.probes, lrs=lrs,
                 methods=meta.METHODS if args.methods is None else tuple(args.methods),
                 strengths=strengths, robustness=not args.no_robustness,
                 progress=not args.json)
    if _record_and_json(args, r.to_dict()):
        return 0
    _out().print(meta.table(r))
    _out().print(meta.headline(r), markup=False)
    return 0


def _cmd_bench_sequential(args: argparse.Namespace) -> int:
    from kif import bench_sequential as bsq
    from kif.erasure import make_config
    from kif.world import FactWorld

    world = FactWorld.generate(args.seed)
    people = bsq.request_people(world, args.requests)  # refused before a model is loaded
    if args.utility_every < 0:
        raise KifError(f"--utility-every must be at least 0 (0: never), got {args.utility_every}")
    config = _parse_settings(args.set)
    make_config(args.method, config)  # unknown settings fail before anything is loaded
    model = open_model(args.model, args)
    level = bsq.oracle_level(world, open_model(args.oracle, args)) if args.oracle else None
    r = bsq.run_sequential(model, world, args.method, people, config=config,
                           utility_every=args.utility_every, oracle_forget_acc=level,
                           profile=args.profile, progress=not args.json)
    if args.plot:
        bsq.plot_sequential(r, args.plot)
    if _record_and_json(args, r):
        return 0
    s = r["summary"]
    _out().print(f"{r['requests']} sequential {args.method} requests: forget_acc of everyone "
                 f"erased {s['final_forget_acc']:.3f} (worst person "
                 f"{s['max_person_forget_acc']:.3f}; oracle {s['oracle_forget_acc']}), retain "
                 f"{s['base_retain_acc']:.3f} -> {s['final_retain_acc']:.3f} (worst "
                 f"{s['worst_retain_acc']:.3f}), shared {s['base_shared_acc']:.3f} -> "
                 f"{s['final_shared_acc']:.3f}, model utility {s['base_model_utility']} -> "
                 f"{s['final_model_utility']}; targets met: {s.get('targets_met')}")
    return 0


def _cmd_bench_reliability(args: argparse.Namespace) -> int:
    from kif.reliability import bench as rb

    for flag in ("kills", "disk_full", "races", "flips", "fuzz"):
        if getattr(args, flag) < 0:
            raise KifError(f"--{flag.replace('_', '-')} must be at least 0")
    cfg = rb.ReliabilityConfig(kills=args.kills, disk_full=args.disk_full, races=args.races,
                               flips=args.flips, fuzz=args.fuzz, seed=args.seed)
    r = rb.run(cfg, progress=not args.json)
    if args.record:
        from kif import results

        results.write(args.record, args.argv, **r)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
    else:
        _print_reliability(r)
    return 1 if r["summary"]["failed"] else 0  # a fault not survived; short runs meet no count


def _print_reliability(r: dict) -> None:
    s = r["summary"]
    table = Table(title="kif bench reliability: faults injected, survived, data lost")
    for col in ("fault", "injected", "survived", "data lost / failed"):
        table.add_column(col)
    table.add_row(f"SIGKILL during a write ({s['killed_mid_write']} before it finished)",
                  str(s["kills"]), str(s["kills"] - s["torn"] - s["next_run_failed"]),
                  f"{s['torn']} torn, {s['inputs_modified']} inputs modified, "
                  f"{s['next_run_failed']} next runs failed")
    table.add_row("full disk / file-size limit", str(s["disk_full"]), str(s["disk_full_clean"]),
                  str(s["disk_full"] - s["disk_full_clean"]))
    table.add_row("two writers, one output", str(s["races"]), str(s["races_clean"]),
                  str(s["races"] - s["races_clean"]))
    table.add_row("tampered file", str(s["tamper_trials"]), str(s["tamper_detected"]),
                  f"{s['tamper_trials'] - s['tamper_detected']} undetected, "
                  f"{s['tamper_executed']} executed, {s['tamper_wrote']} wrote")
    table.add_row("fuzzed reader input", str(s["fuzz_inputs"]),
                  str(s["fuzz_inputs"] - s["fuzz_tracebacks"]), f"{s['fuzz_tracebacks']} tracebacks")
    _out().print(table)
    for name, met in s["targets"].items():
        _out().print(f"{'met' if met else 'NOT met'}: {name}")
    for row in r["crash"] + r["tamper"] + r["fuzz"]:
        for failure in row.get("failures", []) or ([row["first_failure"]]
                                                   if row.get("first_failure") else []):
            _out().print(f"[red]{row.get('writer') or row.get('target') or row.get('reader')}: "
                         f"{failure}[/red]")


def _retrain_label(spec: str) -> str:
    """"seed N" for a `kif zoo build --train-seed N` folder (its card says), else `spec`: results
    files name the retrain, not this machine's path to it."""
    card = pathlib.Path(spec).expanduser() / "kif_card.json"
    try:
        seed = json.loads(card.read_text())["train_config"].get("train_seed")
    except (OSError, ValueError, KeyError, AttributeError):
        seed = None
    return f"seed {seed}" if seed is not None else spec


def _cmd_bench_methods(args: argparse.Namespace) -> int:
    from kif import zoo
    from kif.erasure import bench
    from kif.world import FactWorld, world_concept

    _check_file_flags(args)
    if args.forget:
        _concept_from_files(args)  # bad files fail before anything is loaded
        if not args.oracle:
            raise KifError("kif bench methods --forget needs --oracle (a model that never saw "
                           "the concept) to score Forget Quality against")
    else:
        world = FactWorld.generate(args.seed)
        concept = world_concept(world, [p.name for p in world.split(args.forget_split)])
    model = open_model(args.model, args)
    oracle = open_model(args.oracle or _zoo_oracle(args.model, args.forget_split), args)
    if args.forget:
        concept = _concept_from_files(args, model)
        scores = bench.concept_scorer(concept, oracle)
    else:
        scores = bench.world_scorer(world, args.forget_split, oracle)
    retrained = [(_retrain_label(spec), open_model(spec, args)) for spec in args.retrained]
    rows = bench.bench_methods(model, oracle, args.methods, concept, scores,
                               progress=not args.json, profile=args.profile,
                               retrained=retrained)
    if args.record:
        from kif import results

        results.write(args.record, args.argv, rows=rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    what = args.forget or args.forget_split
    # two tables, so that each fits a terminal: the surface metrics and times, then the
    # broader locality set and the finer Forget Quality
    _print_rows(f"erasure methods on {what} (FQ against the oracle)", rows, {
        "forget_acc": "forget", "forget_paraphrase_acc": "paraphr.", "retain_acc": "retain",
        "neighbour_acc": "nbr", "shared_acc": "shared", "model_utility": "MU",
        "forget_quality": "FQ", "forget_truth_ratio_median": "TR med.", "seconds": "s",
        "seconds_cached": "cached s", "ratio_to_stamp": "x stamp"})
    _print_rows(f"... on held-out and novel phrasings, and Forget Quality over every phrasing",
                rows, {
        "retain_paraphrase_acc": "retain para.", "shared_paraphrase_acc": "shared para.",
        "forget_novel_acc": "forget nov.", "retain_novel_acc": "retain nov.",
        "neighbour_novel_acc": "nbr nov.", "shared_novel_acc": "shared nov.",
        "forget_quality_fine": "FQ fine", "forget_ks_fine": "KS dist. fine"})
    return 0


def _print_rows(title: str, rows: list[dict], columns: dict[str, str]) -> None:
    table = Table(title=title)
    for col in ("method", *columns.values()):
        table.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    for r in rows:
        table.add_row(r["method"], *[fmt(r.get(k)) for k in columns])
    _out().print(table)


def _cmd_bench_fq_ceiling(args: argparse.Namespace) -> int:
    from kif import zoo
    from kif.erasure.bench import never_knew_ceiling
    from kif.world import FactWorld

    if args.draws < 1:
        raise KifError(f"--draws must be at least 1, got {args.draws}")
    world = FactWorld.generate(args.seed)
    world.split(args.forget_split)  # refuse an unknown split before loading anything
    model = open_model(args.model, args)
    oracle = open_model(args.oracle or _zoo_oracle(args.model, args.forget_split), args)
    retrained = [(_retrain_label(spec), open_model(spec, args)) for spec in args.retrained or ()]
    r = never_knew_ceiling(model, world, oracle, args.forget_split, args.draws, args.names_seed,
                           progress=not args.json, retrained=retrained)
    if args.record:
        from kif import results

        results.write(args.record, args.argv, **r)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    for key, who in (("base_fresh", "base model"), ("oracle_fresh", "oracle")):
        s = r[f"{key}_summary"]
        _out().print(f"{who} asked about never-seen names, {r['draws']} draws, {r['questions']} "
                     f"questions: Forget Quality median {s['median']:.2f} (range {s['min']:.2f}-"
                     f"{s['max']:.2f}), >= 0.9 in {s['share_at_least_0.9']:.0%} of draws")
    for row in r["retrained"]:
        _out().print(f"retrained {row['model']} on the real people: Forget Quality "
                     f"{row['forget_quality']:.2g}, over every phrasing {row['forget_quality_fine']:.2g} "
                     f"(KS distance {row['forget_ks_fine']:.3f})")
    if "retrained_summary" in r:
        s = r["retrained_summary"]
        _out().print(f"{len(r['retrained'])} retrains: Forget Quality median "
                     f"{s['forget_quality']['median']:.2g} (range {s['forget_quality']['min']:.2g}-"
                     f"{s['forget_quality']['max']:.2g}); every phrasing: median "
                     f"{s['forget_quality_fine']['median']:.2g}, KS distance median "
                     f"{s['forget_ks_fine']['median']:.3f}")
    return 0


def _cmd_bench_scoring(args: argparse.Namespace) -> int:
    from kif.erasure.bench import candidate_scoring
    from kif.world import FactWorld

    world = FactWorld.generate(args.seed)
    world.split(args.forget_split)  # refuse an unknown split before loading anything
    r = candidate_scoring(open_model(args.model, args), world, args.forget_split, args.repeats,
                          progress=not args.json)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    _out().print(f"{r['questions']} questions, {r['rows']} truth-ratio rows: full rows "
                 f"{r['full_rows_seconds']:.2f} s, shared prompt cache {r['kv_cache_seconds']:.2f} s "
                 f"({r['speedup']:.1f}x; largest log-prob difference {r['max_abs_logprob_diff']:.1e})")
    return 0


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    from kif import bench_scale

    if args.merge:
        return bench_scale.report(bench_scale.merge(args.merge), args)
    cfg = bench_scale.config_from_args(args)
    return bench_scale.report(bench_scale.run(cfg, progress=not args.json, partial=args.out),
                              args)


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    from kif.kernels.bench import main as kernels_bench

    return kernels_bench(args.rest)


# ---- kif erase ---------------------------------------------------------------------------------

def _parse_settings(pairs: Sequence[str] | None) -> dict:
    """`--set key=value` pairs; values are JSON when they parse as JSON (numbers, lists, true,
    null), None for `None`, strings otherwise (the method's config checks their types)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KifError(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = None if value in ("None", "none") else json.loads(value)
        except ValueError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def _report_md(method: str, names: Sequence[str], report: dict, erasure) -> str:
    lines = [f"# kif erase: {method}", "", f"Concepts: {', '.join(names)}", "",
             f"Kind: {erasure.kind}; base weights SHA-256 {erasure.base_hash[:16]}", ""]
    prof = erasure.info.get("profile")
    if prof:
        carried = ", ".join(f"{k} {v}" for k, v in prof["fact_world_constants"].items())
        lines += [f"Settings profile: {prof['name']} (chosen on this model: "
                  f"{', '.join(prof['chosen_on_the_model']) or 'nothing'}; the fact world's "
                  f"constants: {carried or 'none'})", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    for k, v in report.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4g} |")
    if "per_target" in report:
        lines += ["", "Per target:", "", "| target | forget | paraphrase |", "| --- | --- | --- |"]
        for n, d in report["per_target"].items():
            lines.append(f"| {n} | {d.get('forget_acc', float('nan')):.3f} | "
                         f"{d.get('forget_paraphrase_acc', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def _cmd_erase(args: argparse.Namespace) -> int:
    import time

    from kif import zoo
    from kif.erasure import erase, make_config, save_erasure
    from kif.erasure.registry import get
    from kif.erasure.io import _destination
    from kif.erasure.registry import resolve_concepts
    from kif.evaluation import evaluate
    from kif.world import FactWorld

    from kif.evaluation import evaluate_concept

    from kif import probes_cli

    # every check that can fail runs before anything is loaded or written
    auto = _probes_mode(args) == "auto"
    if not auto:
        _check_file_flags(args)
    world = None if args.forget or auto else FactWorld.generate(args.seed)
    if auto:
        inputs = probes_cli.check_inputs(args)
        names = inputs.names
    else:
        concept = (_concept_from_files(args) if args.forget
                   else resolve_concepts(world, args.forget_split or args.concept))
        names = list(concept.subjects)
    get(args.method)
    settings = _parse_settings(args.set)
    make_config(args.method, settings)  # unknown settings fail before anything is loaded
    out = _destination(args.out)
    model = open_model(args.model, args)
    if args.forget:
        concept = _concept_from_files(args, model)
    probes = None
    if auto:
        probes = probes_cli.build(args, model, inputs)
        concept = probes.concept
    oracle_name = args.oracle
    if oracle_name is None and args.forget_split and zoo.base_of(args.model) == args.model:
        oracle_name = zoo.oracle_for(args.forget_split, args.model)
    _check_known(model, concept)
    oracle = open_model(oracle_name, args) if oracle_name else None

    t0 = time.perf_counter()
    erasure = erase(model, concept, method=args.method, config=settings, world=world,
                    base_spec=args.model, progress=not args.json, profile=args.profile)
    seconds = time.perf_counter() - t0
    from kif.distributed import is_main

    if not is_main():
        return 0  # under torchrun: the other ranks' share was the key statistics
    with erasure.apply(model):
        report = (evaluate_concept(model, concept, oracle=oracle) if world is None else
                  evaluate(model, world, args.forget_split or names, oracle=oracle).to_dict())
        if len(names) > 1:  # a batch of targets: each one's own accuracies
            from kif.evaluation import per_subject

            report["per_target"] = per_subject(model, concept)
    if probes is not None:
        from kif.data.selfbuilt import summary

        report["probes"] = summary(probes)
    report = {**report, "method": args.method, "profile": erasure.info["profile"],
              "seconds": round(seconds, 2), "erasure_seconds": erasure.info.get("seconds"),
              **{k: erasure.info[k] for k in ("peak_rss_mb", "peak_cuda_mb") if k in erasure.info},
              "out": str(out)}
    save_erasure(erasure, model, out, report=report,
                 report_md=_report_md(args.method, names, report, erasure))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    who = f"{len(names)} {'subject' if len(names) == 1 else 'subjects'}"
    _print_metrics(f"kif erase --method {args.method}: {who} in {seconds:.1f} s", report)
    _out().print(f"wrote {out} ({erasure.kind}); undo with: kif restore {out} --out DIR")
    return 0


def _zoo_oracle(model: str, split: str) -> str:
    """The zoo oracle of `split` for zoo model `model` (the GPT-2's for a model outside the
    zoo, as before: pass --oracle for another)."""
    from kif import zoo

    base = zoo.base_of(model) or zoo.BASE
    name = zoo.oracle_for(split, base)
    if name is None:
        raise KifError(f"the zoo has no {split} oracle of {base} (it has "
                       f"{', '.join(n for n, e in zoo.ENTRIES.items() if e.base == base and e.forget_split)}"
                       f"): pass --oracle")
    return name


def _add_profile(p: argparse.ArgumentParser) -> None:
    from kif.profiles import PROFILES

    p.add_argument("--profile", choices=list(PROFILES),
                   help="settings profile: fact-world (the constants measured on the zoo's GPT-2) "
                        "or auto (sites and thresholds chosen on the model); default: fact-world "
                        "on the zoo's GPT-2, auto elsewhere")


def _record_path(value: str) -> str:
    """--record's file: refused while parsing (nothing run) when it cannot be a JSON file."""
    path = pathlib.Path(value)
    if path.is_dir() or path.suffix != ".json":
        raise argparse.ArgumentTypeError(f"{value!r} is not a .json file path")
    return value


def _add_record(p: argparse.ArgumentParser) -> None:
    p.add_argument("--record", metavar="FILE.json", type=_record_path,
                   help="also write the rows to a results file, with the command, commit, "
                        "machine and date (kif.results; the README's tables render from these)")


def _probes_mode(args: argparse.Namespace) -> str:
    """`--probes` of `kif erase`: "world" (the fact world's probes) or "auto" (self-built from
    the model); by default "world" only for fact-world people on a zoo model."""
    from kif import zoo
    from kif.world import FactWorld

    mode = getattr(args, "probes", None)
    if mode == "auto" and not args.concept:
        raise KifError("--probes auto builds probes about the names of --concept")
    if mode is None and args.concept:
        known = FactWorld.generate(args.seed).by_name
        mode = ("world" if zoo.base_of(args.model) is not None
                and all(n in known for n in args.concept) else "auto")
    from kif.probes_cli import refuse_unused

    mode = mode or "world"
    refuse_unused(args, mode == "auto")
    return mode


def _check_known(model, concept, min_acc: float = 0.5) -> None:
    """Refuse to erase what the model does not know (nothing to erase, and an "erasure" of it
    would only be collateral damage)."""
    from kif import metrics

    ok = metrics.score_answers(model, [p.prompt for p in concept.forget],
                               [p.answer for p in concept.forget]).correct
    by_person: dict[str, list[bool]] = {}
    for p, c in zip(concept.forget, ok):
        by_person.setdefault(p.subject, []).append(bool(c))
    unknown = [(n, sum(v) / len(v)) for n, v in by_person.items() if sum(v) / len(v) < min_acc]
    if unknown:
        n, acc = unknown[0]
        who = repr(n) if n else "the forget set"
        more = f" (and {len(unknown) - 1} more subjects)" if len(unknown) > 1 else ""
        raise KifError(f"the model does not know {who}{more}: it answers {acc:.0%} of the "
                       f"forget prompts; nothing to erase")


def _cmd_restore(args: argparse.Namespace) -> int:
    from kif.erasure import restore

    out = restore(args.folder, args.out, device=args.device)
    if args.json:
        print(json.dumps({"restored": str(out)}))
    else:
        _out().print(f"wrote {out}: the base weights, bit for bit")
    return 0


def open_model(spec: str, args: argparse.Namespace | None = None):
    """A zoo name, checkpoint folder or erasure folder, as a hooked model (in the `--dtype` and
    on the `--device` of `args`, where given)."""
    from kif.erasure import open_model as _open

    return _open(spec, **(load_options(args) if args is not None else {}))


# ---- --dtype / --device ------------------------------------------------------------------------

def add_model_options(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """`--dtype` and `--device` for a command that loads models. Both are checked while the
    command line is parsed (an absent device is a usage error), so a bad one stops the command
    before it loads or writes anything."""
    from kif.devices import DTYPES

    if dtype:
        p.add_argument("--dtype", choices=DTYPES,
                       help="precision to load the models in (default fp32)")
    p.add_argument("--device", type=_device, default="cpu",
                   help="torch device to run on: cpu (default), cuda, cuda:N, mps")


def _device(spec: str) -> str:
    from kif.devices import check_device

    try:
        return check_device(spec)
    except KifError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_options(args: argparse.Namespace) -> dict:
    """`kif.models.load`'s dtype and device keywords from the parsed `--dtype` / `--device`."""
    from kif.devices import torch_dtype

    out = {"device": getattr(args, "device", "cpu")}
    if getattr(args, "dtype", None) is not None:
        out["dtype"] = torch_dtype(args.dtype)
    return out


# ---- parser ------------------------------------------------------------------------------------

class _UsageError(KifError):
    """A command-line usage error, reported as one line like every other error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error on 2+ lines; we print one
        raise _UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from kif import zoo
    from kif.world import SPLITS

    forget_splits = [s for s in SPLITS if s.startswith("forget")]
    p = _Parser(prog="kif", description="Representation-level concept erasure: "
                                "find where a concept lives, remove it, prove it is gone.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what kif does")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="surface metrics of a model on a fact-world split or a "
                       "concept from files")
    e.add_argument("--model", default=zoo.BASE, help="zoo name, local HF folder or hub name "
                   f"(default {zoo.BASE})")
    eg = e.add_mutually_exclusive_group()
    eg.add_argument("--forget-split", default="forget10", choices=forget_splits)
    eg.add_argument("--concept", nargs="+", action="extend", metavar="PERSON",
                    help="fact-world people to score as the forget set (instead of a split)")
    _add_concept_files(e, eg)
    e.add_argument("--oracle", help="model to measure Forget Quality against, e.g. "
                   f"{zoo.oracle_name('forget10')}")
    e.add_argument("--seed", type=int, default=0, help="fact-world seed (default 0, the zoo's)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    add_model_options(e)
    e.set_defaults(func=_cmd_eval)

    z = sub.add_parser("zoo", help="the embedded fact-world models")
    zs = z.add_subparsers(dest="zoo_command", required=True)
    zl = zs.add_parser("list", help="list the zoo's models")
    zl.add_argument("--json", action="store_true")
    zl.set_defaults(func=_cmd_zoo_list)
    zb = zs.add_parser("build", help="retrain the zoo from the world's seed")
    zb.add_argument("--only", nargs="+", metavar="NAME", help="build only these models")
    zb.add_argument("--arch", choices=zoo.ARCHS,
                    help="build one architecture's models (llama: the Llama twin and its oracle)")
    zb.add_argument("--steps", type=int, help="training steps per model (default: the shipped recipe)")
    zb.add_argument("--out", help="folder to write into (default: the installed zoo)")
    zb.add_argument("--train-seed", type=int, help="seed of the initialisation and batch order "
                    "(default: the world's): the same sentences, another training run (needs --out)")
    zb.add_argument("--json", action="store_true")
    zb.set_defaults(func=_cmd_zoo_build)

    from kif.signatures.registry import KIND_MODULES

    s = sub.add_parser("signatures", help="where a concept lives in a model")
    s.add_argument("--model", default=zoo.BASE)
    sg = s.add_mutually_exclusive_group(required=True)
    sg.add_argument("--concept", metavar="PERSON", help="a person of the fact world")
    _add_concept_files(s, sg)
    s.add_argument("--kind", required=True, choices=list(KIND_MODULES))
    s.add_argument("--out", required=True, help="folder for the signature and its plots")
    s.add_argument("--sae", metavar="FOLDER|RELEASE/ID", help="with --kind sae-features: a "
                   "SAELens SAE folder, or a SAELens release and SAE id (e.g. gpt2-small-res-jb/"
                   "blocks.8.hook_resid_pre), read from the Hugging Face cache (default: the SAEs "
                   "kif ships for its zoo model)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    add_model_options(s)
    s.set_defaults(func=_cmd_signatures)

    b = sub.add_parser("bench", help="benchmarks")
    bs = b.add_subparsers(dest="bench_command", required=True)
    bsig = bs.add_parser("signatures", help="is each signature kind causal?")
    bsig.add_argument("--model", default=zoo.BASE)
    bsig.add_argument("--concepts", type=int, default=10, help="people to test (default 10)")
    bsig.add_argument("--kinds", nargs="+", choices=list(KIND_MODULES))
    bsig.add_argument("--k", type=int, help="components ablated (default: per kind)")
    bsig.add_argument("--per-person", dest="verbose_people", action="store_true")
    bsig.add_argument("--unit-speed", action="store_true",
                      help="time causal tracing of one prompt and knowledge neurons of one fact")
    bsig.add_argument("--seed", type=int, default=0)
    bsig.add_argument("--people-seed", type=int, default=1234,
                      help="draw of the benchmark people (default 1234; another seed gives a fresh, held-out draw)")
    bsig.add_argument("--json", action="store_true")
    _add_record(bsig)
    add_model_options(bsig)
    bsig.set_defaults(func=_cmd_bench_signatures)
    bst = bs.add_parser("stamp", help="STAMP-LR vs the full solve on synthetic keys")
    bst.add_argument("--m", type=int, nargs="+", default=[4096, 14336], help="key widths")
    bst.add_argument("--rank", type=int, default=64)
    bst.add_argument("--lam", type=float, default=None,
                     help="ridge (default: the rank-th eigenvalue of the key Gram matrix)")
    bst.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32")
    bst.add_argument("--json", action="store_true")
    bst.set_defaults(func=_cmd_bench_stamp)
    from kif.erasure.registry import METHOD_MODULES as _METHODS

    bsq = bs.add_parser("sequential", help="single-person erasure requests one after another, "
                                           "each on the model the previous ones left")
    bsq.add_argument("--model", default=zoo.BASE)
    bsq.add_argument("--method", default="stamp", choices=list(_METHODS))
    bsq.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[],
                     help="the method's settings, as for kif erase")
    bsq.add_argument("--requests", type=int, default=20,
                     help="people, one request each: forget10's, then the retain split's")
    bsq.add_argument("--utility-every", type=int, default=10,
                     help="score model utility every N requests and after the last (0: "
                          "never; it is most of the scoring time)")
    bsq.add_argument("--oracle", default=zoo.oracle_name("forget10"),
                     help="the forget reference: its accuracy on the forget10 people it never "
                          "saw ('' to skip)")
    bsq.add_argument("--seed", type=int, default=0)
    bsq.add_argument("--plot", metavar="FILE.png", help="the curve, as a PNG")
    bsq.add_argument("--json", action="store_true")
    _add_record(bsq)
    _add_profile(bsq)
    add_model_options(bsq)
    bsq.set_defaults(func=_cmd_bench_sequential)
    bpr = bs.add_parser("probes", help="self-built probes against the fact world's ground "
                                       "truth: facts found, false facts, erasure by name")
    bpr.add_argument("--model", default=zoo.BASE)
    bpr.add_argument("--oracle", default=zoo.oracle_name("forget10"))
    bpr.add_argument("--people", type=int, default=10, help="retain people to elicit")
    bpr.add_argument("--erase", type=int, default=3, help="forget10 people to erase by name")
    bpr.add_argument("--methods", nargs="+", default=["stamp", "kif"], choices=list(_METHODS))
    bpr.add_argument("--seed", type=int, default=0)
    bpr.add_argument("--json", action="store_true")
    _add_record(bpr)
    add_model_options(bpr)
    bpr.set_defaults(func=_cmd_bench_probes)

    bme = bs.add_parser("meter", help="the meter's meta-evaluation: latent_trace_score's AUC "
                        "(models that know a concept vs models that never knew it) and its "
                        "robustness under int4 quantisation and relearning")
    bme.add_argument("--model", default=zoo.BASE, help="a zoo base model with an oracle")
    bme.add_argument("--forget-split", default="forget10")
    bme.add_argument("--probes", nargs="+", default=["latent"],
                     help="meter probes or sets (default: latent, all that the score reads)")
    bme.add_argument("--lrs", nargs="+", type=float,
                     help="gradient-ascent learning rates (default 2e-6 5e-6 2e-5)")
    bme.add_argument("--strengths", nargs="+", type=float,
                     help="output-only suppression strengths in logit units (default 10 3)")
    bme.add_argument("--methods", nargs="*", choices=list(_METHODS),
                     help="kif erasure methods in the population (default stamp npo)")
    bme.add_argument("--no-robustness", action="store_true",
                     help="skip the int4 and relearning audits (faithfulness only)")
    bme.add_argument("--json", action="store_true")
    _add_record(bme)
    bme.set_defaults(func=_cmd_bench_meter)

    brl = bs.add_parser("reliability", help="faults injected into kif's writes and reads: "
                        "kills, full disks, races, tampered files, fuzzed inputs")
    brl.add_argument("--kills", type=int, default=400, help="SIGKILLs during writes, over the "
                     "five writers (erase, restore, signatures, zoo build, statistics cache)")
    brl.add_argument("--disk-full", type=int, default=6,
                     help="full-disk trials per writer, on a tmpfs and under a file-size limit")
    brl.add_argument("--races", type=int, default=4, help="two-writer races per writer")
    brl.add_argument("--flips", type=int, default=20, help="byte flips per file read back")
    brl.add_argument("--fuzz", type=int, default=10_000, help="fuzzed inputs per reader (0: skip)")
    brl.add_argument("--seed", type=int, default=0)
    brl.add_argument("--json", action="store_true")
    _add_record(brl)
    brl.set_defaults(func=_cmd_bench_reliability)

    bm = bs.add_parser("methods", help="every erasure method on a forget split, vs the oracle")
    bm.add_argument("--model", default=zoo.BASE)
    bm.add_argument("--oracle", help="default: the zoo oracle of the split")
    bmg = bm.add_mutually_exclusive_group()
    bmg.add_argument("--forget-split", default="forget10")
    _add_concept_files(bm, bmg)
    bm.add_argument("--methods", nargs="+", choices=list(_METHODS), default=["stamp"])
    bm.add_argument("--retrained", nargs="+", metavar="MODEL", default=(),
                    help="models retrained without the people like the oracle, another seed "
                    "(`kif zoo build --train-seed`): scored as rows, the targets an erasure can "
                    "reach (retrain median: the Forget Quality target)")
    _add_profile(bm)
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument("--json", action="store_true")
    _add_record(bm)
    add_model_options(bm)
    bm.set_defaults(func=_cmd_bench_methods)
    bfq = bs.add_parser("fq-ceiling", help="the Forget Quality a model that never knew the "
                        "people scores (base and oracle asked about never-seen names)")
    bfq.add_argument("--model", default=zoo.BASE)
    bfq.add_argument("--oracle", help="default: the zoo oracle of the split")
    bfq.add_argument("--forget-split", default="forget10")
    bfq.add_argument("--draws", type=int, default=20)
    bfq.add_argument("--names-seed", type=int, default=100)
    bfq.add_argument("--retrained", nargs="+", metavar="MODEL",
                     help="models retrained without the people like the oracle, another seed "
                     "(`kif zoo build --train-seed`): each one's Forget Quality against the oracle")
    bfq.add_argument("--seed", type=int, default=0)
    bfq.add_argument("--json", action="store_true")
    _add_record(bfq)
    add_model_options(bfq)
    bfq.set_defaults(func=_cmd_bench_fq_ceiling)
    bsc = bs.add_parser("scoring", help="truth-ratio scoring: each question run once (KV cache "
                        "shared by its answers) vs full rows")
    bsc.add_argument("--model", default=zoo.BASE)
    bsc.add_argument("--forget-split", default="forget10")
    bsc.add_argument("--repeats", type=int, default=3)
    bsc.add_argument("--seed", type=int, default=0)
    bsc.add_argument("--json", action="store_true")
    add_model_options(bsc)
    bsc.set_defaults(func=_cmd_bench_scoring)
    bsl = bs.add_parser("scale", help="time and peak memory of load, stamp, suppress, kif and "
                        "the meter on real shapes; power-law exponents in params and facts")
    from kif.bench_scale import add_arguments as _scale_arguments

    _scale_arguments(bsl)
    bsl.set_defaults(func=_cmd_bench_scale)
    bk = bs.add_parser("kernels", help="fused Triton kernels vs their torch references (GPU)",
                       add_help=False)
    bk.add_argument("rest", nargs=argparse.REMAINDER,
                    help="arguments of python -m kif.kernels.bench (e.g. --json, --interpret-smoke)")
    bk.set_defaults(func=_cmd_bench_kernels)

    from kif.erasure.registry import DEFAULT_METHOD, METHOD_MODULES

    r = sub.add_parser("erase", help="erase a concept from a model")
    r.add_argument("--model", default=zoo.BASE, help="zoo name, HF checkpoint folder, hub name")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--concept", nargs="+", action="extend", metavar="NAME",
                   help="names to erase (one joint edit): fact-world people, or any named "
                        "subject the model knows (see --probes)")
    g.add_argument("--forget-split", choices=forget_splits)
    _add_concept_files(r, g)
    r.add_argument("--probes", choices=("auto", "world"),
                   help="auto: build the probes from the model itself (kif probes); world: the "
                        "fact world's (default: world for fact-world people on a zoo model, "
                        "else auto)")
    from kif import probes_cli

    probes_cli.add_arguments(r)
    r.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHOD_MODULES),
                   help=f"erasure method (default {DEFAULT_METHOD})")
    r.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="method settings, e.g. --set steps=200 lr=0.002 (repeatable)")
    _add_profile(r)
    r.add_argument("--oracle", help="model for Forget Quality (default: the zoo oracle of "
                   "--forget-split when erasing the zoo model)")
    r.add_argument("--out", required=True, help="new folder for the erased model or patch")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true")
    add_model_options(r)
    r.set_defaults(func=_cmd_erase)

    d = sub.add_parser("data", help="concept data files")
    ds = d.add_subparsers(dest="data_command", required=True)
    dx = ds.add_parser("export", help="write a fact-world split as concept files (kif JSONL or TOFU)")
    dx.add_argument("--forget-split", required=True, choices=forget_splits)
    dx.add_argument("--format", default="kif", choices=("kif", "tofu"))
    dx.add_argument("--out", required=True, help="new folder for the files")
    dx.add_argument("--seed", type=int, default=0, help="fact-world seed (default 0, the zoo's)")
    dx.add_argument("--json", action="store_true")
    dx.set_defaults(func=_cmd_data_export)

    from kif.meter.cli import add_parser as add_meter_parser

    add_meter_parser(sub)
    from kif.probes_cli import add_parser as add_probes_parser

    add_probes_parser(sub, zoo.BASE)

    rs = sub.add_parser("restore", help="the base model of an erasure folder, bit for bit")
    rs.add_argument("folder", help="an erasure folder written by kif erase")
    rs.add_argument("--out", required=True, help="new folder for the restored checkpoint")
    rs.add_argument("--json", action="store_true")
    add_model_options(rs, dtype=False)
    rs.set_defaults(func=_cmd_restore)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv  # a results file records the command as typed
    except _UsageError as exc:
        return _err(str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        from kif.distributed import run_command  # under torchrun: data-parallel, rank 0 writes

        return run_command(args, args.func)
    except _EXPECTED_ERRORS as exc:
        return _err(str(exc))
    except KeyboardInterrupt:
        return _err("interrupted")


if __name__ == "__main__":
    sys.exit(main())
