"""The data-parallel paths (`kif.distributed`): two CPU processes on the gloo backend compute the
same key statistics as one process, the meter dealt over two ranks gives the single process'
report, `python -m kif` under two ranks writes from rank 0 only; and `kif.models.load` with an
accelerate device map (CPU + disk offload) gives the logits of a plain load."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from kif import distributed, models
from kif.errors import KifError

HOOK = "blocks.1.mlp.hook_post"
N_ROWS = 600  # with batch 256: one process reads 256+256+88 rows, two ranks 256+44 and 256+44
SPLIT = "forget01"  # two people
PROBES = ["logit-lens", "answer-rank"]  # + surface: rank 0 surface, rank 1 the lenses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _corpus(model) -> tuple[list[list[int]], list[int]]:
    """Rows of 3..24 random token ids after a BOS, the 'last prompt token' somewhere inside."""
    g = torch.Generator().manual_seed(0)
    ids, last = [], []
    bos = model.tokenizer.bos_token_id
    for _ in range(N_ROWS):
        n = int(torch.randint(3, 25, (1,), generator=g))
        ids.append([bos] + torch.randint(1, model.cfg.d_vocab, (n,), generator=g).tolist())
        last.append(int(torch.randint(1, n + 1, (1,), generator=g)))
    return ids, last


# ---- pure helpers ------------------------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 3), (600, 2), (5, 8)])
def test_rank_shards_tile_the_rows_in_order(n, world):
    shards = [distributed.rank_shard(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_dealing_gives_each_item_to_exactly_one_rank_and_balances_cost():
    items = list("abcdefg")
    cost = dict(zip(items, [9, 1, 1, 1, 1, 1, 4])).get
    for c in (None, cost):
        dealt = [distributed.deal(items, c, world=3, rank_=r) for r in range(3)]
        assert sorted(x for d in dealt for x in d) == items
        assert all(d == [x for x in items if x in d] for d in dealt)  # run order kept
    loads = sorted(sum(cost(x) for x in distributed.deal(items, cost, world=2, rank_=r))
                   for r in range(2))
    assert loads == [9, 9]  # longest first: a | g + five 1s
    assert distributed.deal(items) == items  # not distributed: everything


def test_not_distributed_is_the_identity():
    t = torch.arange(4.0)
    assert not distributed.is_distributed() and distributed.is_main()
    assert distributed.all_reduce_sum(t) is t
    assert distributed.all_gather_json({"a": 1}) == [{"a": 1}]
    assert distributed.rank_shard(5) == range(5)
    assert not distributed.init_from_env({"WORLD_SIZE": "1"})


def test_a_half_set_environment_is_one_line():
    with pytest.raises(KifError, match="MASTER_PORT is not set: launch with torchrun"):
        distributed.init_from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                                   "MASTER_ADDR": "127.0.0.1"})


# ---- two processes -----------------------------------------------------------------------------

def _stats_worker(rank: int, world: int, port: int, out: str, cache: str) -> None:
    from safetensors.torch import save_file

    from kif.erasure import stats

    torch.set_num_threads(1)
    assert distributed.init_from_env(_env(rank, world, port))
    try:
        model = models.load("fact-world", verify=False)
        ids, last = _corpus(model)
        got = stats.compute_key_moments(model, ids, last, HOOK, token_weight=0.003,
                                        backend="torch")
        # the cache: only rank 0 writes it; a file only rank 0 holds makes every rank
        # recompute (a rank that skipped the pass would leave the others waiting)
        os.environ["KIF_CACHE"] = os.path.join(cache, str(rank))
        prompts = ["The birthplace of Miasmar Viahos is", "Miasmar Viahos works for"]
        first = stats.key_moments(model, prompts, [" X", " Y"], HOOK, 0.003)
        again = stats.key_moments(model, prompts, [" X", " Y"], HOOK, 0.003)
        assert torch.equal(first.gram, again.gram)
        save_file({"gram": got.gram, "mean_last": got.mean_last,
                   "n_rows": torch.tensor(got.n_rows)}, os.path.join(out, f"rank{rank}.st"))
    finally:
        distributed.shutdown()


def test_two_process_key_statistics_equal_one_process(tmp_path):
    """Tolerance: 1e-6 of the largest entry (about 16 float32 ulps there; measured 8e-9 on
    8000 rows). Each rank's float32 activations come from batches of other shapes (other
    padding widths and row counts, so other BLAS blockings) and its float32 token-Gram sums add
    the rows in another order; the float64 reductions add nothing measurable. Bit equality is
    not promised, float32 rounding is."""
    from safetensors.torch import load_file

    from kif.erasure import stats

    port = _free_port()
    (tmp_path / "cache").mkdir()
    mp.spawn(_stats_worker, args=(2, port, str(tmp_path), str(tmp_path / "cache")), nprocs=2,
             join=True)
    torch.set_num_threads(1)
    model = models.load("fact-world", verify=False)
    ids, last = _corpus(model)
    one = stats.compute_key_moments(model, ids, last, HOOK, token_weight=0.003, backend="torch")
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.st")) for r in (0, 1))
    assert torch.equal(r0["gram"], r1["gram"])  # every rank ends with the same statistics
    assert int(r0["n_rows"]) == one.n_rows == N_ROWS
    scale = one.gram.abs().max()
    assert (r0["gram"] - one.gram).abs().max() <= 1e-6 * scale
    assert (r0["mean_last"] - one.mean_last).abs().max() <= 1e-6 * one.mean_last.abs().max()
    # only rank 0 wrote the cache
    assert list((tmp_path / "cache" / "0" / "key-moments").glob("*.safetensors"))
    assert not (tmp_path / "cache" / "1").exists()


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import numpy as np

    assert distributed.init_from_env(_env(rank, world, port))
    try:
        # ranks send objects of different sizes, with what probe results hold
        mine = {"rank": rank, "nan": float("nan"), "inf": float("inf"), "np": np.float64(0.5),
                "t": torch.tensor([1.0, 2.0]), "text": "é" * (rank * 1000 + 1)}
        with open(os.path.join(out, f"got{rank}.json"), "w") as f:
            json.dump(distributed.all_gather_json(mine), f)
    finally:
        distributed.shutdown()


def test_gathered_objects_cross_ranks_as_json_not_pickle(tmp_path):
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"got{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] or repr(got[0]) == repr(got[1])  # NaN != NaN
    for r, part in enumerate(got[0]):
        assert part["rank"] == r and part["np"] == 0.5 and part["t"] == [1.0, 2.0]
        assert part["nan"] != part["nan"] and part["inf"] == float("inf")
        assert part["text"] == "é" * (r * 1000 + 1)


def _meter_worker(rank: int, world: int, port: int, out: str) -> None:
    from kif.meter import trace
    from kif.meter.bench import output_suppression
    from kif.world import FactWorld

    torch.set_num_threads(1)
    assert distributed.init_from_env(_env(rank, world, port))
    try:
        base = models.load("fact-world", verify=False)
        world_ = FactWorld.generate(0)
        answers = [p.answer for p in world_.person_probes(world_.split(SPLIT), "train")]
        erased = output_suppression(base, answers)
        report = trace(base, erased, SPLIT, probes=PROBES, world=world_, progress=False)
        if distributed.is_main():
            with open(os.path.join(out, "report.json"), "w") as f:
                json.dump(report.to_dict(), f)
    finally:
        distributed.shutdown()


def _comparable(report: dict) -> dict:
    """A report without what differs between runs by design: times, who ran what, and the hash
    of a model's permanent hooks (the repr of the hook functions: addresses differ by process)."""
    r = {k: v for k, v in report.items() if k not in ("seconds", "timings", "settings")}
    r["hashes"] = {k: v and v.split("+hooks:")[0] for k, v in report["hashes"].items()}
    r["probe_results"] = {n: {k: v for k, v in p.items() if k != "seconds"}
                          for n, p in report["probe_results"].items()}
    return r


def test_the_meter_dealt_over_two_ranks_gives_the_single_process_report(tmp_path):
    from kif.meter import trace
    from kif.meter.bench import output_suppression
    from kif.world import FactWorld

    mp.spawn(_meter_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    two = json.loads((tmp_path / "report.json").read_text())
    torch.set_num_threads(1)
    base = models.load("fact-world", verify=False)
    world_ = FactWorld.generate(0)
    answers = [p.answer for p in world_.person_probes(world_.split(SPLIT), "train")]
    one = trace(base, output_suppression(base, answers), SPLIT, probes=PROBES, world=world_,
                progress=False).to_dict()
    ranks = two["settings"].pop("ranks")
    assert sorted(n for r in ranks for n in r) == sorted(one["settings"]["probes"])
    assert all(ranks)  # both ranks ran probes
    assert two["settings"] == one["settings"]
    assert _comparable(two) == _comparable(one)  # per-concept verdicts and scores included
    assert one["verdict"] == "suppressed"  # a real audit, not two empty ones


def test_under_torchrun_rank_0_writes_and_other_commands_refuse(tmp_path):
    """`python -m kif` as two torchrun ranks: a command without a data-parallel path stops in
    one line on rank 0 (exit 2 from every rank), nothing written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "kif", "data", "export", "--forget-split",
                               "forget01", "--out", str(tmp_path / "x")],
                              env={**env, **_env(r, 2, port)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert outs[0][1].strip().count("\n") == 0
    assert "`kif data` has no data-parallel path" in outs[0][1]
    assert outs[1] == ("", "")  # rank 1 says nothing
    assert not (tmp_path / "x").exists()


# ---- accelerate device maps --------------------------------------------------------------------

def test_a_cpu_and_disk_offload_map_gives_the_plain_logits(tmp_path):
    torch.set_num_threads(1)
    plain = models.load("fact-world")
    dm = {"embed": "cpu", "pos_embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk",
          "blocks.2": "disk", "blocks.3": "cpu", "ln_final": "cpu", "unembed": "cpu"}
    spread = models.load("fact-world", device_map=dm, offload_folder=tmp_path / "offload")
    params = dict(spread.named_parameters())
    assert params["blocks.1.mlp.W_in"].device.type == "meta"  # really offloaded
    assert params["blocks.0.mlp.W_in"].device.type == "cpu"
    assert any((tmp_path / "offload").iterdir())
    tokens = torch.randint(0, plain.cfg.d_vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    assert torch.equal(spread(tokens), plain(tokens))
    names = lambda n: n.endswith(("hook_resid_post", "mlp.hook_post"))  # noqa: E731
    _, c_plain = plain.run_with_cache(tokens, names_filter=names)
    _, c_spread = spread.run_with_cache(tokens, names_filter=names)
    assert set(c_plain.keys()) == set(c_spread.keys())
    assert all(torch.equal(c_plain[k], c_spread[k]) for k in c_plain.keys())
    assert torch.equal(models.load("fact-world", device_map={"": "cpu"})(tokens), plain(tokens))


@pytest.mark.parametrize("kwargs,message", [
    (dict(device_map={"blocks.9": "cpu"}), "does not have: blocks.9"),
    (dict(device_map={"embed": "cpu"}), "device_map:"),
    (dict(device_map={"": "disk"}), "pass offload_folder"),
    (dict(device_map="everywhere"), "use a dict or one of auto"),
    (dict(device_map={"": "cpu"}, device="meta"), "device or device_map, not both"),
])
def test_a_bad_device_map_is_one_line(kwargs, message):
    with pytest.raises(models.ModelLoadError, match=message) as err:
        models.load("fact-world", verify=False, **kwargs)
    assert "\n" not in str(err.value)
