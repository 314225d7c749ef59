"""The meter's relearning rate chosen on each trained architecture (`auto` profile,
`kif.meter.probes.relearning.choose_lr`): the base attacked on the shown half of forget10's facts
at each rate the walk tries, and its accuracy on the measured half. One thread.

    python results/meter_relearning_lr.py OUT.json"""
import sys
import time

import torch

import kif
from kif import results
from kif.meter import trace

MODELS = ("fact-world", "fact-world-llama")


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name in MODELS:
        base = kif.load(name)
        c0 = time.process_time()
        r = trace(base, base, "forget10", probes=["relearning"], progress=False, profile="auto")
        v = r.probes["relearning"].values
        base_acc, *tried = v["lr_trials"]
        rows.append({"model": name, "chosen_lr": v["lr"], "base_acc": base_acc["measured_acc"],
                     # keyed "1e-04", "2e-04", ...: the README's columns reach them by name
                     "acc_after": {f"{t['lr']:.0e}": t["measured_acc"] for t in tried}, "cpu_seconds": round(time.process_time() - c0, 1)})
        print(rows[-1], flush=True)
    results.write(sys.argv[1], None, split="forget10", threads=1, rows=rows)


if __name__ == "__main__":
    main()
