"""The floor under one step of STAMP's residual-target loop on the random GPT-2 small checkpoint
of `kif bench scale` (20 rows, the tail after layer 4, one thread): the step multiplies the rows
by every weight matrix of the seven blocks after layer 4 and by the unembedding, once forward and
once backward (the gradient reaches the rows, not the frozen weights). Those products alone,
without TransformerLens or autograd around them, on the same matrices, are what no
implementation of a 100-step definition can go below on this machine in fp32.

    python results/stamp_step_floor.py OUT.json"""
import sys
import time

import torch
import torch.nn.functional as F

import kif
from kif import bench_scale as bs, metrics, results
from kif.erasure import spread
from kif.erasure.stamp import _frozen

LAYER, ROWS, REPEATS, STEPS = 4, 20, 10, 100


def _best(fn) -> float:
    fn()  # warm
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(REPEATS):
            fn()
        best = min(best, (time.perf_counter() - t0) / REPEATS)
    return best


def main() -> None:
    torch.set_num_threads(1)
    model = kif.load(bs.model_spec(bs.SHAPES["gpt2-124m"], bs.ScaleConfig()))
    ids = metrics.encode_prompts(model, [p.prompt for p in bs.synthetic_concept(ROWS, 0).forget])
    with _frozen(model):
        h, tail = spread.last_token_tail(model, ids[:ROWS], LAYER)
        delta = torch.zeros(h.shape, requires_grad=True)
        step = _best(lambda: F.log_softmax(tail(h + delta).float(), -1)[:, 0].sum().backward())
        mats = [p.detach().reshape(p.shape[0], -1) if p.dim() == 2 else
                p.detach().permute(1, 0, 2).reshape(p.shape[1], -1)  # W_Q/K/V: [d_model, heads*d_head]
                for name, p in model.named_parameters()
                if any(name == f"blocks.{l}.{w}" for l in range(LAYER + 1, model.cfg.n_layers)
                       for w in ("attn.W_Q", "attn.W_K", "attn.W_V", "mlp.W_in", "mlp.W_out"))]
        mats += [model.blocks[l].attn.W_O.detach().reshape(-1, model.cfg.d_model)
                 for l in range(LAYER + 1, model.cfg.n_layers)]
        mats.append(model.W_U.detach())
        xs = [torch.randn(ROWS, w.shape[0]) for w in mats]
        gs = [torch.randn(ROWS, w.shape[1]) for w in mats]

        def products():
            for w, x, g in zip(mats, xs, gs):
                x @ w       # forward
                g @ w.T     # backward, to the rows
        floor = _best(products)
    n_params = sum(w.numel() for w in mats)
    row = {"rows": ROWS, "matrices": len(mats), "weights_mb": round(n_params * 4 / 2**20, 1),
           "step_seconds": round(step, 4), "products_seconds": round(floor, 4),
           "gb_per_s": round(2 * n_params * 4 / floor / 1e9, 2),
           "steps": STEPS, "loop_seconds": round(STEPS * step, 1),
           "loop_floor_seconds": round(STEPS * floor, 1)}
    print(row, flush=True)
    results.write(sys.argv[1], None, threads=1, layer=LAYER, rows=[row])


if __name__ == "__main__":
    main()
