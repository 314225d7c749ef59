"""Benchmark of the data-parallel key-statistics pass: one process against N gloo ranks on CPU.

    python -m kif.bench_distributed [--rows 8000] [--nproc 2] [--model fact-world] [--json]

The corpus is `--rows` rows of 3..24 random token ids (seeded) after a BOS; the statistics are
STAMP's (`kif.erasure.stats.compute_key_moments` at blocks.1.mlp.hook_post, token weight 0.003).
Only the pass is timed: the ranks start, load the model and meet at a barrier first. Prints the
seconds of each run, the speed-up and the largest difference of the two Grams relative to the
largest entry (float32 rounding: the two runs batch the rows differently).
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch

HOOK = "blocks.1.mlp.hook_post"
TOKEN_WEIGHT = 0.003


def corpus(model, rows: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids, last = [], []
    bos = model.tokenizer.bos_token_id
    for _ in range(rows):
        n = int(torch.randint(3, 25, (1,), generator=g))
        ids.append([bos] + torch.randint(1, model.cfg.d_vocab, (n,), generator=g).tolist())
        last.append(int(torch.randint(1, n + 1, (1,), generator=g)))
    return ids, last


def _worker(rank: int, world: int, port: int, spec: str, rows: int, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from kif import distributed, models
    from kif.erasure.stats import compute_key_moments

    torch.set_num_threads(1)
    distributed.init_from_env({"RANK": str(rank), "WORLD_SIZE": str(world),
                               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(port)})
    try:
        model = models.load(spec, verify=False)
        ids, last = corpus(model, rows)
        dist.barrier()
        t = time.perf_counter()
        got = compute_key_moments(model, ids, last, HOOK, TOKEN_WEIGHT)
        seconds = time.perf_counter() - t
        if rank == 0:
            save_file({"gram": got.gram, "seconds": torch.tensor(seconds)},
                      os.path.join(out, "dist.safetensors"))
    finally:
        distributed.shutdown()


def main(argv=None) -> int:
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from kif import models
    from kif.erasure.stats import compute_key_moments

    p = argparse.ArgumentParser(prog="python -m kif.bench_distributed", description=__doc__)
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", default="fact-world")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = models.load(args.model, verify=False)
    ids, last = corpus(model, args.rows)
    t = time.perf_counter()
    one = compute_key_moments(model, ids, last, HOOK, TOKEN_WEIGHT)
    single = time.perf_counter() - t
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args.nproc, port, args.model, args.rows, out),
                 nprocs=args.nproc, join=True)
        got = load_file(os.path.join(out, "dist.safetensors"))
    dist_s = float(got["seconds"])
    rel = float((got["gram"] - one.gram).abs().max() / one.gram.abs().max())
    report = {"model": args.model, "hook": HOOK, "rows": args.rows,
              "tokens": sum(map(len, ids)), "nproc": args.nproc, "threads_per_process": 1,
              "single_seconds": round(single, 3), "distributed_seconds": round(dist_s, 3),
              "speedup": round(single / dist_s, 3), "max_rel_diff": rel}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.rows} rows: 1 process {single:.2f} s, {args.nproc} ranks {dist_s:.2f} s "
              f"({single / dist_s:.2f}x); largest Gram difference {rel:.1e} of its largest entry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
