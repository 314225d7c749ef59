"""The sweep behind STAMP's optimized-target defaults on the Llama twin (forget10): residual
targets at `opt_decay` after `steps` Adam steps, then the spread edit over `layers` at each forget
weight, scored with `kif eval`'s keys. Usage: python results/stamp_spread_sweep.py LAYERS DECAY STEPS
WEIGHTS [THREADS] [TOKEN_WEIGHT], e.g. 0,1,2,3 3e-4 100 0.5,1,2 (results/llama_stamp_spread_sweep.json)."""
import sys, time, json, torch, kif, dataclasses
from kif import metrics
from kif.world import FactWorld, world_concept
from kif.evaluation import evaluate
from kif.erasure import spread
from kif.erasure.stamp import StampConfig, stamp_delta, _retain_gram, _frozen, layer_attribution
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
layers = [int(x) for x in sys.argv[1].split(",")]
decay = float(sys.argv[2]); steps = int(sys.argv[3]); fws = [float(x) for x in sys.argv[4].split(",")]
tw = float(sys.argv[6]) if len(sys.argv) > 6 else 0.003
model = kif.load("fact-world-llama"); world = FactWorld.generate()
concept = world_concept(world, [p.name for p in world.split("forget10")])
cfg = StampConfig(target="optimized", layers=tuple(layers), opt_decay=decay, opt_steps=steps, token_weight=tw)
t0 = time.time()
print("attr", {k: round(v, 3) for k, v in layer_attribution(model, concept.forget).items()}, flush=True)
grams = {l: _retain_gram(model, concept, f"blocks.{l}.mlp.hook_post", cfg)[0] for l in layers}
forget = [p.prompt for p in concept.forget]
tid = metrics.encode_answers(model, [concept.refusal.target])[0][0]
with _frozen(model):
    deltas = spread.residual_targets(model, metrics.encode_prompts(model, forget), layers[-1], tid,
                                     steps, cfg.opt_lr, decay).delta
print("targets s", round(time.time() - t0, 1), "norm", float(deltas.norm(dim=-1).mean()), flush=True)
for fw in fws:
    c = dataclasses.replace(cfg, forget_weight=fw)
    d, _ = spread.spread_edit(model, forget, layers, deltas, grams, lambda k, t, g: stamp_delta(k, t, g, c))
    r = spread.with_deltas(model, d, lambda: evaluate(model, world, "forget10"))
    print(json.dumps({"layers": layers, "decay": decay, "steps": steps, "fw": fw, "tw": tw} | {k: round(v, 3) for k, v in r.to_dict().items() if isinstance(v, float)}), flush=True)
