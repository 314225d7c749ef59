"""LoRA on the activations (`kif.erasure.lora.HookedLoRA`) is the same function as the folded
weights W + A @ B, on GPT-2 and on the grouped-query Llama twin, and its factors are the update
the `kif` pipeline reports."""

import pytest
import torch

from kif import models
from kif.erasure.lora import HookedLoRA, lora_targets


@pytest.mark.parametrize("name", ["fact-world", "fact-world-llama"])
def test_hooked_lora_is_the_folded_weights(name):
    model = models.load(name)
    targets = lora_targets(model, range(model.cfg.n_layers))
    kinds = {n.split(".")[-1] for n, _, _ in targets}
    # every weight kind of the architecture is covered (GQA's stored _W_K/_W_V, the SwiGLU gate)
    assert {"W_Q", "W_O", "W_out"} <= kinds
    assert ({"_W_K", "_W_V", "W_gate"} <= kinds) == (name == "fact-world-llama")
    lora = HookedLoRA(model, targets, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for f in lora.factors.values():
            f.b.normal_(0, 0.02)  # b starts at zero: make every update non-trivial
    tokens = model.to_tokens(["Alice Smith was born in", "The capital of France is a city"])
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in lora.factors}
    try:
        with torch.no_grad():
            hooked = model(tokens)
            lora.remove()
            base = model(tokens)
            for n in lora.factors:
                params[n].add_(lora.delta(n).to(params[n].dtype))
            folded = model(tokens)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
    assert (hooked - base).abs().max() > 0.1  # the update matters
    torch.testing.assert_close(hooked, folded, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(tokens), base)  # removed: no hook is left


def test_hooked_lora_switches_off_and_refuses_split_inputs():
    model = models.load("fact-world")
    on = {"value": True}
    lora = HookedLoRA(model, lora_targets(model, [0]), 2, torch.Generator().manual_seed(0),
                      active=lambda: on["value"])
    with torch.no_grad():
        for f in lora.factors.values():
            f.b.normal_(0, 0.05)
        tokens = model.to_tokens(["Alice Smith was born in"])
        live = model(tokens)
        on["value"] = False
        off = model(tokens)
    lora.remove()
    with torch.no_grad():
        assert torch.equal(model(tokens), off) and not torch.equal(live, off)
    model.cfg.use_split_qkv_input = True
    try:
        with pytest.raises(Exception, match="use_split_qkv_input"):
            HookedLoRA(model, lora_targets(model, [0]), 2, torch.Generator())
    finally:
        model.cfg.use_split_qkv_input = False


def test_retain_kl_in_micro_batches_is_the_full_batch_kl():
    """The pipeline's retain loss, backpropagated a few rows at a time from final residuals, has
    the value and the gradients of KL(base || student) over every real token of the batch at
    once, computed from the full logits."""
    import torch.nn.functional as F

    from kif import metrics
    from kif.erasure import pipeline
    from kif.inplace import inplace_training

    model = models.load("fact-world")
    texts = ["Alice Smith was born in Paris", "Bob", "The capital of France is Paris, a city",
             "Carol Jones works as a", "Dan"]
    rtok = pipeline._pad(model, metrics.encode_prompts(model, texts))
    real = rtok != metrics._pad_id(model)
    grads = {}
    with inplace_training(model, []) as state:
        state.trainable([])
        lora = HookedLoRA(model, lora_targets(model, [1, 3]), 4, torch.Generator().manual_seed(0),
                          active=lambda: not state.in_base)
        try:
            with torch.no_grad():
                for f in lora.factors.values():
                    f.b.normal_(0, 0.05)
            for rows in (len(texts), 2, None):  # None: sized by the activation budget
                for p in lora.parameters():
                    p.grad = None
                kl = pipeline._retain_backward(model, state, rtok, 3.0, rows)
                grads[rows] = (float(kl), [p.grad.clone() for p in lora.parameters()])
            for p in lora.parameters():
                p.grad = None
            with torch.no_grad(), state.base():
                logp = F.log_softmax(model(rtok, padding_side="right")[real], -1)
            logq = F.log_softmax(model(rtok, padding_side="right")[real], -1)
            full = F.kl_div(logq, logp, log_target=True, reduction="batchmean")
            (3.0 * full).backward()
            reference = (float(full), [p.grad.clone() for p in lora.parameters()])
        finally:
            lora.remove()
    for kl, g in grads.values():
        assert kl == pytest.approx(reference[0], rel=1e-5)
        for a, b in zip(g, reference[1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_micro_batch_rows_follow_the_activation_budget():
    from kif.erasure import pipeline

    model = models.load("fact-world")
    # the zoo model's whole retain batch (32 rows of about 20 tokens) fits one micro-batch
    assert pipeline.micro_rows(model, 20) >= 32
    assert pipeline.micro_rows(model, 40) == pipeline.micro_rows(model, 20) // 2
    assert pipeline.micro_rows(model, 20, budget=1) == 1  # never fewer than one row


def test_retain_micro_batch_below_one_row_is_refused():
    from kif.erasure import erase
    from kif.erasure.core import ErasureError
    from kif.world import FactWorld, world_concept

    world = FactWorld.generate(0)
    concept = world_concept(world, [world.split("forget01")[0].name])
    with pytest.raises(ErasureError, match="retain_micro_batch must be at least 1"):
        erase(models.load("fact-world"), concept, "kif", {"retain_micro_batch": 0})
