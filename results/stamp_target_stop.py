"""STAMP's optimized residual targets with a stopping probability (`opt_stop`) instead of a fixed
100 Adam steps, on the Llama twin's forget10 under `--profile auto` (the forget weight calibrated
as usual), scored with `kif eval`'s keys, one row per setting:

    python results/stamp_target_stop.py OUT.json STEPS:LR:STOP [STEPS:LR:STOP ...]

(STOP `none`: every row takes STEPS steps, the definition before the stopping probability.)"""
import json
import sys
import time

import torch

import kif
from kif import results
from kif.erasure import erase
from kif.evaluation import evaluate
from kif.world import FactWorld


def main() -> None:
    torch.set_num_threads(1)
    out, settings = sys.argv[1], sys.argv[2:]
    model, world = kif.load("fact-world-llama"), FactWorld.generate()
    rows = []
    for s in settings:
        steps, lr, stop = s.split(":")
        config = {"opt_steps": int(steps), "opt_lr": float(lr),
                  "opt_stop": None if stop == "none" else float(stop)}
        erase(model, "forget10", "stamp", config=config, world=world, profile="auto")  # statistics cached
        t0 = time.process_time()
        er = erase(model, "forget10", "stamp", config=config, world=world, profile="auto")
        cpu = time.process_time() - t0
        with er.applied(model):
            r = evaluate(model, world, "forget10")
        row = {**config, "forget_weight": er.info["forget_weight"],
               "targets": er.info["residual_targets"], "cached_cpu_seconds": round(cpu, 2),
               "sections": er.info["seconds"]}
        row |= {k: round(v, 4) for k, v in r.to_dict().items() if isinstance(v, float)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    results.write(out, None, threads=1, rows=rows)


if __name__ == "__main__":
    main()
