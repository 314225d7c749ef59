"""kif probes' build (`kif.data.selfbuilt.build` on fact-world: the target, its neighbours and
retain subjects elicited) timed in two source trees, each build in its own process on one
thread, alternating the order per person; the built records must be the same.

    python results/probes_build_speed.py BEFORE_TREE AFTER_TREE OUT.json
(a tree: a checkout of kif, e.g. `git worktree add ../before COMMIT`)
"""
import datetime
import json
import os
import platform
import subprocess
import sys

ONE = r'''
import hashlib, json, pathlib, sys, time
from kif import models
from kif.data import selfbuilt
from kif.data.elicit import ElicitConfig
from kif.data.formats import read_text_corpus
model = models.load("fact-world")
corpus = read_text_corpus(pathlib.Path(selfbuilt.GENERAL_CORPUS))
c0 = time.process_time()
sb = selfbuilt.build(model, [sys.argv[1]], config=ElicitConfig(), corpus=corpus)
seconds = time.process_time() - c0
rec = json.dumps(selfbuilt.records(sb), sort_keys=True)
print(json.dumps({"cpu_seconds": seconds, "n_records": len(selfbuilt.records(sb)),
                  "records_sha": hashlib.sha256(rec.encode()).hexdigest()[:16]}))
'''
PEOPLE = (("Dilmis Nalstas", ("before", "after")), ("Zalni Regur", ("after", "before")),
          ("Miasmar Viahos", ("before", "after")))


def build(tree: str, person: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    # cwd: `python -c` puts the working folder first on sys.path, before PYTHONPATH
    out = subprocess.run([sys.executable, "-c", ONE, person], env=env, cwd=tree,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def commit(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def main(before: str, after: str, out: str) -> None:
    trees = {"before": before, "after": after}
    rows = []
    for person, order in PEOPLE:
        got = {which: build(trees[which], person) for which in order}
        b, a = got["before"], got["after"]
        rows.append({"person": person, "before_cpu_s": round(b["cpu_seconds"], 1),
                     "after_cpu_s": round(a["cpu_seconds"], 1),
                     "speedup": round(b["cpu_seconds"] / a["cpu_seconds"], 2),
                     "same_records": b["records_sha"] == a["records_sha"],
                     "n_records": a["n_records"], "order": list(order)})
        print(rows[-1], flush=True)
    json.dump({"command": "python results/probes_build_speed.py BEFORE AFTER OUT",
               "commits": {k: commit(v) for k, v in trees.items()}, "commit": commit(after),
               "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}",
               "date": datetime.date.today().isoformat(), "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
