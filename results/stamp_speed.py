"""STAMP's cached time (retain statistics on disk) before and after a change, each tree in its
own process, the order alternated, one thread: on the Llama twin's forget10 and on the random
GPT-2 small checkpoint of `kif bench scale` (20 facts), both under `--profile auto` (the spread
edit toward optimized targets). The edits of the two trees are compared too.

    python results/stamp_speed.py BEFORE_TREE AFTER_TREE OUT.json [ROUNDS]"""
import json
import pathlib
import subprocess
import sys
import tempfile

CHILD = r'''
import json, sys, time, torch
torch.set_num_threads(1)
import kif
from kif.erasure import erase
case, out = sys.argv[1], sys.argv[2]
if case == "llama":
    from kif.world import FactWorld
    model, concept, world = kif.load("fact-world-llama"), "forget10", FactWorld.generate()
else:
    from kif import bench_scale as bs
    model = kif.load(bs.model_spec(bs.SHAPES["gpt2-124m"], bs.ScaleConfig()))
    concept, world = bs.synthetic_concept(20, 0), None
erase(model, concept, "stamp", world=world, profile="auto")  # the statistics on disk
t0, c0 = time.perf_counter(), time.process_time()
er = erase(model, concept, "stamp", world=world, profile="auto")
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
torch.save({n: (d.a.double() @ d.b.double() if d.a is not None else d.dense.double()) for n, d in er.deltas.items()}, out + ".pt")
json.dump({"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
           "sections": {k: round(v, 2) for k, v in er.info["seconds"].items()},
           "forget_weight": er.info["forget_weight"]}, open(out, "w"))
'''


def _head(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    import torch

    from kif import results

    before, after, out = sys.argv[1:4]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    tmp = pathlib.Path(tempfile.mkdtemp())
    rows = []
    for case in ("gpt2-124m", "llama"):
        for r in range(rounds):
            trees = (("before", before), ("after", after))
            for tag, tree in (trees if r % 2 == 0 else trees[::-1]):
                f = tmp / f"{case}-{tag}-{r}.json"
                subprocess.run([sys.executable, "-c", CHILD, case, str(f)], cwd=tree, check=True,
                               env={"PYTHONPATH": tree, "OMP_NUM_THREADS": "1",
                                    "PATH": "/usr/bin:/bin", "HOME": str(pathlib.Path.home())})
                row = {"case": case, "tree": tag, "round": r, **json.loads(f.read_text())}
                print(json.dumps(row), flush=True)
                rows.append(row)
        a = torch.load(tmp / f"{case}-before-0.json.pt")
        b = torch.load(tmp / f"{case}-after-0.json.pt")
        diff = max(float((a[n] - b[n]).norm() / a[n].norm()) for n in a)
        rows.append({"case": case, "edit_relative_difference": diff, "same_weights": set(a) == set(b)})
        print(json.dumps(rows[-1]), flush=True)
    results.write(out, None, threads=1, before=_head(before), after=_head(after), rows=rows)


if __name__ == "__main__":
    main()
