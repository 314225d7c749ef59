"""Train the zoo's sparse autoencoders (SAELens 6.x) on the fact-world base model's residual stream.

One standard ReLU SAE per hook `blocks.{l}.hook_resid_post`, trained with SAELens' L1 objective
(Bricken et al. 2023, "Towards Monosemanticity"; the decoder-norm-weighted L1 of the Anthropic
April 2024 update: L = ||x - x_hat||^2 + lambda * sum_i a_i ||W_dec[i]||), offline:
`LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=Dataset.from_dict(
{"tokens": rows}))`. The tokens are the world's training sentences, `[BOS] + tokens(sentence)`,
whole sentences packed into fixed-length rows (as the base model was trained), reshuffled for every
pass over the corpus. BOS / padding positions are left out of training (`exclude_special_tokens`).

After training the activation-norm scale is folded in by SAELens and the decoder rows are folded to
unit norm (the function is unchanged; a clamp of -c then moves the residual by exactly c along a
unit direction, as in Farrell et al. 2024), the weights are rounded to float16 for shipping, and
the SAE is reloaded from disk and evaluated on held-out text (the world's held-out phrasings,
never trained on): explained variance EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 and
mean L0 over the same tokens. Each SAE is a SAELens-loadable folder (`cfg.json` +
`sae_weights.safetensors`, no pickle) plus `kif_sae_card.json`, under
`<out_root>/<model>/<hook>/`.
"""

import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import time
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kif import integrity, zoo

log = logging.getLogger(__name__)

SAE_DIR = zoo.ZOO_DIR / "saes"
CARD = "kif_sae_card.json"


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    """Training recipe of the shipped SAEs (defaults are what ships)."""

    d_sae: int = 4096  # expansion 16 over d_model 256
    l1_coefficient: float = 5.0  # on activations normalised to mean norm sqrt(d_in)
    l1_warm_up_steps: int = 100
    lr: float = 1e-3
    lr_warm_up_steps: int = 50
    lr_decay_steps: int = 80
    context_size: int = 64
    train_batch_size_tokens: int = 1024
    training_tokens: int = 400_000
    store_batch_size_prompts: int = 16
    n_batches_in_buffer: int = 32  # * context_size >= train_batch_size_tokens (SAELens' buffer)
    n_batches_for_norm_estimate: int = 20
    dtype_on_disk: str = "float16"
    threads: int = 1


def pack_rows(ids: Sequence[Sequence[int]], row_len: int, pad: int, n_passes: int,
              seed: int) -> Int[Tensor, "rows pos"]:
    """`n_passes` shuffled passes over the sentences `ids` (each already `[BOS] + tokens`), whole
    sentences packed greedily into rows of `row_len` tokens and right-padded with `pad`."""
    rng = random.Random(seed)
    rows: list[list[int]] = []
    for _ in range(n_passes):
        order = list(range(len(ids)))
        rng.shuffle(order)
        row: list[int] = []
        for i in order:
            seq = list(ids[i])[:row_len]
            if len(row) + len(seq) > row_len:
                rows.append(row)
                row = []
            row = row + seq
        if row:
            rows.append(row)
    out = torch.full((len(rows), row_len), pad, dtype=torch.long)
    for r, seq in enumerate(rows):
        out[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _sentence_ids(model, texts: Sequence[str]) -> list[list[int]]:
    from kif import metrics

    return metrics.encode_prompts(model, texts)


def _padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Int[Tensor, "batch pos"],
                                                               Int[Tensor, " batch"]]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs])


@torch.no_grad()
def hook_activations(model, hook: str, seqs: Sequence[Sequence[int]], batch_size: int = 512,
                     skip_first: bool = True) -> Float[Tensor, "tokens d_model"]:
    """The activations at `hook` of every real token of the right-padded sequences `seqs`, as one
    [tokens, d] float32 matrix (position 0, the BOS, left out when `skip_first`)."""
    layer = int(hook.split(".")[1])
    pad = int(model.tokenizer.pad_token_id or 0)
    chunks = []
    for start in range(0, len(seqs), batch_size):
        tokens, lengths = _padded(seqs[start:start + batch_size], pad)
        _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=[hook],
                                        stop_at_layer=layer + 1, padding_side="right")
        pos = torch.arange(tokens.shape[1])
        real = (pos[None, :] < lengths[:, None]) & (pos[None, :] >= int(skip_first))
        chunks.append(cache[hook][real.to(cache[hook].device)].float())
    return torch.cat(chunks)


@torch.no_grad()
def evaluate_sae(sae, x: Float[Tensor, "tokens d_model"]) -> dict[str, float]:
    """Explained variance, mean L0 and the fraction of features never active on `x`."""
    x = x.to(sae.W_enc.device, torch.float32)
    acts = sae.encode(x)
    recon = sae.decode(acts)
    resid = (x - recon).double().pow(2).sum()
    total = (x.double() - x.double().mean(0)).pow(2).sum()
    active = acts > 0
    return {"explained_variance": float(1 - resid / total),
            "l0": float(active.sum(-1).double().mean()),
            "dead_fraction": float((~active.any(0)).double().mean()),
            "n_tokens": int(x.shape[0])}


def _train_one(model, hook: str, rows: Int[Tensor, "rows pos"], cfg: SAETrainConfig, seed: int,
               model_name: str):
    import datasets
    from sae_lens import (LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner,
                          LoggingConfig, StandardTrainingSAEConfig)

    bos = int(model.tokenizer.bos_token_id)
    if cfg.n_batches_in_buffer * cfg.context_size < cfg.train_batch_size_tokens:
        raise ValueError("n_batches_in_buffer * context_size must be >= train_batch_size_tokens")
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=int(model.cfg.d_model), d_sae=cfg.d_sae, l1_coefficient=cfg.l1_coefficient,
            l1_warm_up_steps=cfg.l1_warm_up_steps, apply_b_dec_to_input=True,
            normalize_activations="expected_average_only_in", dtype="float32", device="cpu"),
        model_name=model_name, hook_name=hook, dataset_path="", streaming=False,
        is_dataset_tokenized=True, context_size=cfg.context_size, prepend_bos=True,
        training_tokens=cfg.training_tokens, train_batch_size_tokens=cfg.train_batch_size_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        n_batches_in_buffer=cfg.n_batches_in_buffer,
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
        lr=cfg.lr, lr_warm_up_steps=cfg.lr_warm_up_steps, lr_decay_steps=cfg.lr_decay_steps,
        lr_scheduler_name="constant", exclude_special_tokens=[bos], seed=seed, device="cpu",
        logger=LoggingConfig(log_to_wandb=False), output_path=None, checkpoint_path=None,
        n_checkpoints=0, verbose=False)
    dataset = datasets.Dataset.from_dict({"tokens": rows.tolist()})
    torch.manual_seed(seed)
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_model=model,
                                            override_dataset=dataset)
    return runner.run()


def _finalise(training_sae, folder: pathlib.Path, dtype_on_disk: str):
    """Write the inference SAE with unit-norm decoder rows in `dtype_on_disk`, then reload it
    (the shipped bytes are what gets evaluated)."""
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE

    training_sae.save_inference_model(folder)
    sae = SAE.load_from_disk(folder, device="cpu")
    sae.fold_W_dec_norm()
    sae.save_model(folder)
    weights = folder / "sae_weights.safetensors"
    dtype = {"float16": torch.float16, "float32": torch.float32}[dtype_on_disk]
    save_file({k: v.to(dtype).contiguous() for k, v in load_file(str(weights)).items()},
              str(weights))
    return SAE.load_from_disk(folder, device="cpu")


def build_saes(out_root: str | os.PathLike = SAE_DIR, layers: Sequence[int] = (0, 1, 2, 3),
               seed: int = 0, cfg: SAETrainConfig = SAETrainConfig(), model=None,
               world=None, model_name: str = zoo.BASE) -> dict[str, dict[str, Any]]:
    """Train, evaluate and save one SAE per `blocks.{l}.hook_resid_post` of `model` (default: the
    zoo's fact-world base model) under `out_root/<model_name>/<hook>/`. Returns each hook's card
    (explained variance and L0 on held-out text, d_sae, train seconds, bytes on disk)."""
    from kif import models
    from kif.world import FactWorld

    model = models.load(zoo.BASE) if model is None else model
    world = FactWorld.generate(0) if world is None else world
    out_root = pathlib.Path(out_root)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    cards: dict[str, dict[str, Any]] = {}
    try:
        pad = int(model.tokenizer.pad_token_id or model.tokenizer.bos_token_id)
        ids = _sentence_ids(model, world.training_texts())
        n_tok = sum(len(s) for s in ids)
        n_passes = max(1, math.ceil(1.15 * cfg.training_tokens / n_tok))
        heldout = [p.prompt + p.answer + "." for p in world.person_probes(world.known(), "heldout")]
        heldout += [p.prompt + p.answer + "." for p in world.shared_probes("heldout")]
        held_ids = _sentence_ids(model, heldout)
        for layer in layers:
            hook = f"blocks.{layer}.hook_resid_post"
            rows = pack_rows(ids, cfg.context_size, pad, n_passes, seed + 7919 * layer)
            dest = out_root / model_name / hook
            with integrity.staged(dest) as tmp:
                t0 = time.perf_counter()
                trained = _train_one(model, hook, rows, cfg, seed + layer, model_name)
                seconds = time.perf_counter() - t0
                sae = _finalise(trained, tmp, cfg.dtype_on_disk)
                stats = evaluate_sae(sae, hook_activations(model, hook, held_ids))
                train_stats = evaluate_sae(sae, hook_activations(model, hook, ids[:4000]))
                card = {"model": model_name, "hook": hook, "architecture": "standard (ReLU, L1)",
                        "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae), "seed": seed,
                        "heldout": stats, "train_sample": train_stats,
                        "explained_variance": round(stats["explained_variance"], 4),
                        "l0": round(stats["l0"], 2), "train_seconds": round(seconds, 1),
                        "train_threads": cfg.threads, "train_config": dataclasses.asdict(cfg)}
                card["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
                (tmp / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
                zoo.publish(tmp, dest)
                cards[hook] = card
                log.info("SAE %s: EV %.3f, L0 %.1f, %.0f s", hook, card["explained_variance"],
                         card["l0"], seconds)
    finally:
        torch.set_num_threads(prev_threads)
    return cards
