"""What one step of STAMP's residual-target loop costs on the random GPT-2 small checkpoint of
`kif bench scale` (the tail after layer 4: seven blocks for one token and the unembedding, a
forward and a backward), at 10, 20 and 40 rows, one thread: the step streams the weights, so its
cost barely grows with the rows, and 100 steps cannot fit a 10 s budget on this machine.

    python results/stamp_step_cost.py OUT.json"""
import json
import sys
import time

import torch
import torch.nn.functional as F

import kif
from kif import results
from kif import bench_scale as bs, metrics
from kif.erasure import spread
from kif.erasure.stamp import _frozen

LAYER, REPEATS = 4, 10


def main() -> None:
    torch.set_num_threads(1)
    model = kif.load(bs.model_spec(bs.SHAPES["gpt2-124m"], bs.ScaleConfig()))
    ids = metrics.encode_prompts(model, [p.prompt for p in bs.synthetic_concept(40, 0).forget])
    rows = []
    with _frozen(model):
        for n in (10, 20, 40):
            h, tail = spread.last_token_tail(model, ids[:n], LAYER)
            delta = torch.zeros(h.shape, requires_grad=True)
            best = float("inf")
            for _ in range(3):  # the fastest of three runs of REPEATS steps
                t0 = time.perf_counter()
                for _ in range(REPEATS):
                    F.log_softmax(tail(h + delta).float(), -1)[:, 0].sum().backward()
                best = min(best, (time.perf_counter() - t0) / REPEATS)
            rows.append({"rows": n, "step_seconds": round(best, 4)})
            print(json.dumps(rows[-1]), flush=True)
    results.write(sys.argv[1], None, threads=1, layer=LAYER, rows=rows)


if __name__ == "__main__":
    main()
