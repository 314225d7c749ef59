"""How far STAMP's optimized residual targets (`kif.erasure.spread.residual_targets`, Adam at
lr 0.1 with the L2 decay 3e-4, as StampConfig's defaults) are from converged at 100 steps: the
targets of four forget10 people at 25-400 steps, their mean norm and their distance to the
400-step targets, on the zoo's GPT-2 (edit from layer 0) and the Llama twin (from layer 1).

    python results/stamp_target_convergence.py
"""
import time

from kif import metrics, models
from kif.erasure import spread
from kif.erasure.stamp import _frozen
from kif.world import FactWorld

STEPS = (25, 50, 100, 200, 400)


def main() -> None:
    world = FactWorld.generate(0)
    probes = world.person_probes(world.split("forget10")[:4], "train")
    for name, first in (("fact-world", 0), ("fact-world-llama", 1)):
        m = models.load(name)
        ids = metrics.encode_prompts(m, [p.prompt for p in probes])
        target = metrics.encode_answers(m, [" unknown"])[0][0]
        layer = first + (m.cfg.n_layers - 1 - first) // 2
        got = {}
        with _frozen(m):
            for steps in STEPS:
                t0 = time.process_time()
                d = spread.residual_targets(m, ids, layer, target, steps, 0.1, 3e-4).delta
                got[steps] = (d, time.process_time() - t0)
        ref = got[STEPS[-1]][0]
        for steps, (d, seconds) in got.items():
            print(f"{name} {steps:4d} steps: mean norm {float(d.norm(dim=1).mean()):6.2f}, "
                  f"distance to {STEPS[-1]} steps / its norm "
                  f"{float((d - ref).norm() / ref.norm()):.3f}, {seconds:.1f} CPU s")


if __name__ == "__main__":
    main()
