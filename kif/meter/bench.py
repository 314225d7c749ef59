"""Benchmark of the latent-trace meter on the zoo: does it separate intact, suppressed and deleted?

    python -m kif.meter.bench --forget-split forget10 [--model fact-world-llama] [--probes all]
        [--ga] [--erased NAME=PATH ...] [--json] [--profile fact-world|auto]
        [--record results/FILE.json]

Audits of a zoo base model (`--model`, default the fact world's GPT-2; its oracle for the split
is found by name) on the forget split's people:

* ``base``: the base against itself (target: ``intact``);
* ``oracle|oracle``: the oracle trained without the split's people, calibrated against itself
  (target: ``deleted``, latent_trace_score 0: a sanity check of the calibration);
* ``oracle|unseen``: the same oracle calibrated *without* an oracle, against the base on unseen
  people (target: ``deleted``, latent_trace_score <= 0.05: the meter's real false-alarm test);
* ``suppression``: an output-only suppression of the split's answers (`output_suppression`)
  (target: ``suppressed``, latent_trace_score >= 0.5);
* with ``--ga``: gradient ascent on the forget facts with a small learning rate until the forget
  accuracy reaches the oracle's (its quantization and relearning recoveries are reported;
  target: ``suppressed`` wherever a latent probe recovers >= 0.2);
* with ``--erased NAME=PATH``: any erased model (a `kif erase --out` folder or a checkpoint),
  audited against the oracle like `kif meter --oracle` does, in the same table.

Prints the separation table, the seconds per probe of the first full audit (cold caches: it
trains the tuned lens) and of the last, the time of a cold surface + lens audit, and each target
with PASS/FAIL. Times are given as wall and as CPU seconds (one thread: OMP_NUM_THREADS=1); on a
shared machine the CPU time is what the audit takes on an idle core, and the targets use it.
"""

import argparse
import json
import sys
import time

import torch

from kif import metrics


def output_suppression(model, answers, *, strength: float = 10.0):
    """An output-only suppression: a copy of `model` (sharing its weights: only the hook differs,
    `kif.inplace.shared_copy`) with a permanent hook on the last block's
    output that removes, at every position, the part of the residual stream that the final norm
    and unembedding turn into the logits of the answers' first tokens, and pushes those logits
    down by about `strength` (in logit units). Every earlier layer is untouched: the facts are
    still computed, only the last layer hides them (the textbook "suppressed, not deleted")."""
    from kif.inplace import shared_copy

    tokens = sorted({a[0] for a in metrics.encode_answers(model, list(answers))})
    m = shared_copy(model)
    w_u = m.W_U.detach().float()[:, tokens]                                # [d, K]
    ln_w = getattr(getattr(m, "ln_final", None), "w", None)
    v = w_u * (ln_w.detach().float()[:, None] if ln_w is not None else 1.0)
    if m.cfg.normalization_type in ("LN", "LNPre"):
        v = v - v.mean(0, keepdim=True)  # LayerNorm centres h: only h's centred part counts
    q, _ = torch.linalg.qr(v)                                              # [d, K]
    # the least-norm push with push . v_k = -1 for every answer token k
    push = -(v @ torch.linalg.pinv(v.T @ v) @ torch.ones(len(tokens)))

    def hook(act, hook):
        a = act.float()
        c = a - a.mean(-1, keepdim=True)
        sigma = (c.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        out = a - (a @ q.to(a.device)) @ q.T.to(a.device)
        out = out + strength * sigma * push.to(a.device)
        return out.to(act.dtype)

    m.add_hook(f"blocks.{m.cfg.n_layers - 1}.hook_resid_post", hook, is_permanent=True)
    m.kif_name = f"{getattr(model, 'kif_name', 'model')}+output-suppression"
    return m


def gradient_ascent(model, probes, *, target_acc: float, lr: float = 5e-6, batch: int = 32,
                    max_steps: int = 400, check_every: int = 5, seed: int = 0):
    """Gradient ascent on the answers of `probes` (a deep copy: the result is audited beside
    `model`, so it cannot be trained in place), stopped once their greedy accuracy is at most
    `target_acc` (e.g. the oracle's forget accuracy)."""
    from kif.meter.probes.relearning import answer_nll, answer_rows, freeze, trainable_copy

    m = trainable_copy(model)
    rows = answer_rows(m, probes)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    steps = 0
    acc = 1.0
    while steps < max_steps:
        with torch.enable_grad():
            idx = torch.randint(len(rows[0]), (batch,), generator=g).tolist()
            loss = -answer_nll(m, rows, idx)  # ascend the answers' cross-entropy
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps += 1
        if steps % check_every == 0:
            acc = metrics.probe_accuracy(m, probes)
            if acc <= target_acc:
                break
    freeze(m)
    m.kif_name = f"{getattr(model, 'kif_name', 'model')}+ga(lr={lr:g},steps={steps})"
    m.kif_ga = {"steps": steps, "lr": lr, "forget_acc": acc}
    return m


def _row(name: str, report, seconds: float) -> dict:
    s = report.scores
    relearning = report.probes.get("relearning")
    return {"case": name, "verdict": report.verdict,
            "latent_trace_score": report.latent_trace_score, "counts": report.counts,
            "seconds": round(seconds, 1), "cpu": round(report.timings.get("cpu total", 0.0), 1),
            "scores": s,
            # the attack's rate and, where the profile chose it on the base, every trial
            "relearning": None if relearning is None or relearning.skipped else {
                k: relearning.values.get(k) for k in ("lr", "lr_chosen_on_the_model", "lr_trials")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kif.meter.bench")
    ap.add_argument("--forget-split", default="forget10")
    ap.add_argument("--probes", nargs="+", default=["all"])
    ap.add_argument("--ga", action="store_true", help="also audit a gradient-ascent model")
    ap.add_argument("--model", default=None, help="a zoo base model (default fact-world)")
    ap.add_argument("--erased", nargs="+", default=[], metavar="NAME=PATH",
                    help="erased models to audit against the oracle (kif erase folders or "
                         "checkpoints), one column each")
    ap.add_argument("--json", action="store_true")
    from kif.profiles import PROFILES

    ap.add_argument("--profile", choices=list(PROFILES),
                    help="the meter's settings profile (default: fact-world on the zoo's GPT-2, "
                         "auto elsewhere)")
    ap.add_argument("--record", metavar="FILE.json",
                    help="also write the rows to a results file with the command, commit, "
                         "machine and date (kif.results)")
    args = ap.parse_args(argv)
    bad = [e for e in args.erased if "=" not in e or not e.split("=", 1)[0]]
    if bad:
        ap.error(f"--erased takes NAME=PATH, got {bad[0]!r}")

    from rich.console import Console
    from rich.table import Table

    from kif import models, zoo
    from kif.meter import trace
    from kif.meter.audit import clear_caches
    from kif.world import FactWorld

    console = Console(stderr=args.json)
    world = FactWorld.generate(0)
    split = args.forget_split
    base_name = args.model or zoo.BASE
    base = models.load(base_name)
    oracle = models.load(zoo.oracle_for(split, base_name))
    people = world.split(split)
    answers = [a for p in people for a in p.attributes.values()]
    # the suppression first: its audit runs with cold caches (the tuned lens is trained there)
    cases = {"suppression": (output_suppression(base, answers), None), "base": (base, None),
             "oracle|oracle": (oracle, oracle), "oracle|unseen": (oracle, None)}
    if args.ga:
        forget = world.person_probes(people, "train")
        target = metrics.probe_accuracy(oracle, forget)
        t0 = time.perf_counter()
        ga = gradient_ascent(base, forget, target_acc=target)
        retain = world.person_probes(world.split("retain")[:60], "train", [0, 2])
        ga.kif_ga["retain_acc"] = metrics.probe_accuracy(ga, retain)
        ga.kif_ga["seconds"] = round(time.perf_counter() - t0, 1)
        ga.kif_ga["oracle_forget_acc"] = target
        cases["gradient-ascent"] = (ga, None)
        console.print(f"gradient ascent: {ga.kif_ga}", markup=False)
    if args.erased:
        from kif.erasure import open_model

        for spec in args.erased:
            name, path = spec.split("=", 1)
            cases[name] = (open_model(path), oracle)

    # cold surface + lens audit
    clear_caches()
    t0 = time.perf_counter()
    fast = trace(base, cases["suppression"][0], split, probes=["fast"], world=world,
                 progress=False, profile=args.profile)
    fast_seconds = time.perf_counter() - t0
    fast_cpu = fast.timings["cpu total"]

    clear_caches()
    rows, reports = [], {}
    for name, (erased, orc) in cases.items():
        t0 = time.perf_counter()
        r = trace(base, erased, split, oracle=orc, probes=args.probes, world=world,
                  progress=not args.json and sys.stderr.isatty(), profile=args.profile)
        rows.append(_row(name, r, time.perf_counter() - t0))
        reports[name] = r
    first = next(iter(reports.values()))
    last = list(reports)[-1]
    probe_seconds = {n: round(p.seconds, 2) for n, p in reports[last].probes.items()}
    cold_seconds = {n: round(p.seconds, 2) for n, p in first.probes.items()}
    cold_cpu = {n: round(first.timings.get(f"cpu {n}", float("nan")), 2) for n in first.probes}
    warm_cpu = {n: round(reports[last].timings.get(f"cpu {n}", float("nan")), 2)
                for n in first.probes}

    targets = [
        ("base vs itself: intact", reports["base"].verdict == "intact"),
        ("oracle vs itself as oracle: deleted, latent_trace_score = 0",
         reports["oracle|oracle"].verdict == "deleted"
         and (reports["oracle|oracle"].latent_trace_score or 0) <= 1e-9),
        ("oracle calibrated on unseen people: deleted, latent_trace_score <= 0.05",
         reports["oracle|unseen"].verdict == "deleted"
         and (reports["oracle|unseen"].latent_trace_score or 0) <= 0.05),
        ("output-only suppression: suppressed, latent_trace_score >= 0.5",
         reports["suppression"].verdict == "suppressed"
         and (reports["suppression"].latent_trace_score or 0) >= 0.5),
        (f"surface + lens audit <= 10 s, CPU time (cold: {fast_cpu:.1f} s CPU, "
         f"{fast_seconds:.1f} s wall)", fast_cpu <= 10),
        (f"full audit <= 120 s, CPU time (cold: {rows[0]['cpu']:.0f} s CPU, "
         f"{rows[0]['seconds']:.0f} s wall; warm base, {rows[-1]['case']}: "
         f"{rows[-1]['cpu']:.0f} s CPU, {rows[-1]['seconds']:.0f} s wall)",
         rows[0]["cpu"] <= 120),
    ]
    if "gradient-ascent" in reports:
        ga = reports["gradient-ascent"]
        rec = [n for n, p in ga.probes.items()
               if p.group == "latent" and p.score is not None and p.score >= 0.2]
        targets.append((f"gradient ascent: suppressed where a latent probe recovers >= 0.2 "
                        f"({', '.join(rec) or 'none'})",
                        (ga.verdict == "suppressed") == bool(rec) or ga.verdict == "intact"))
    if args.record:
        from kif import profiles, results

        results.write(args.record, None, model=base_name, forget_split=split,
                      profile=args.profile or profiles.default_for(base), rows=rows,
                      targets=[{"target": t, "pass": ok} for t, ok in targets])
    if args.json:
        print(json.dumps({"rows": rows, "fast_seconds": fast_seconds, "fast_cpu": fast_cpu,
                          "probe_seconds_cold": cold_seconds, "probe_cpu_cold": cold_cpu,
                          "probe_seconds_warm": probe_seconds, "probe_cpu_warm": warm_cpu,
                          "targets": [{"target": t, "pass": ok} for t, ok in targets],
                          "ga": getattr(cases.get("gradient-ascent", (None,))[0], "kif_ga",
                                        None)}, indent=2, default=str))
        return 0
    names = list(first.probes)
    table = Table(title=f"kif meter separation on {split} ({len(people)} people)")
    table.add_column("probe")
    for r in rows:
        table.add_column(r["case"], justify="right")
    for key in ("verdict", "latent_trace_score"):
        table.add_row(key, *[str(r[key]) if key == "verdict" else
                             ("-" if r[key] is None else f"{r[key]:.3f}") for r in rows])
    table.add_row("concepts i/s/d", *[f"{r['counts']['intact']}/{r['counts']['suppressed']}/"
                                      f"{r['counts']['deleted']}" for r in rows])
    for n in names:
        table.add_row(f"{n} ({first.probes[n].group})",
                      *["skip" if reports[r["case"]].probes[n].skipped else
                        ("-" if r["scores"][n] is None else f"{r['scores'][n]:.3f}")
                        for r in rows])
    table.add_row("seconds (wall)", *[f"{r['seconds']:.1f}" for r in rows])
    table.add_row("seconds (CPU)", *[f"{r['cpu']:.1f}" for r in rows])
    console.print(table)
    t2 = Table(title=f"seconds per probe, wall / CPU ({rows[0]['case']}: cold caches; "
                     f"{last}: warm base)")
    t2.add_column("probe")
    t2.add_column(rows[0]["case"], justify="right")
    t2.add_column(last, justify="right")
    for n in names:
        t2.add_row(n, f"{cold_seconds[n]:.1f} / {cold_cpu[n]:.1f}",
                   f"{probe_seconds.get(n, float('nan')):.1f} / {warm_cpu[n]:.1f}")
    console.print(t2)
    for t, ok in targets:
        console.print(f"{'PASS' if ok else 'FAIL'}  {t}", markup=False)
    if "gradient-ascent" in reports:
        ga = reports["gradient-ascent"]
        v = {k: ga.probes[k].values for k in ("quantization", "relearning") if k in ga.probes}
        console.print(f"gradient ascent {cases['gradient-ascent'][0].kif_ga}: "
                      f"{json.dumps(v, default=str)}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
