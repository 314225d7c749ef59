"""Packed training rows (whole sentences, shuffled, packed into fixed-width rows) and the
learning-rate schedule the zoo was trained with; `kif.erasure.distill` retrains the same way."""

import math
import random

import torch


def packed_batches(ids: list[list[int]], rows: int, row_len: int, pad: int, rng: random.Random):
    """Endless batches `(tokens, mask)` of `rows` x `row_len` tokens, each row packed with whole
    shuffled sentences (`ids`, each starting with its separator token); `mask` marks real tokens.

    Packing is what makes held-out phrasings work: with one sentence per row every fact sits at
    the same absolute positions (GPT-2 learns positional embeddings), and a model memorises
    (position, frame) pairs instead of a frame-independent name -> fact lookup. Measured on the
    zoo's training: one sentence per row gave 32 % on held-out phrasings at 100 % training
    accuracy. Sentences longer than `row_len` are cut to it.
    """
    ids = [s[:row_len] for s in ids]
    if not ids:
        raise ValueError("no sentences to pack")
    while True:
        order = list(range(len(ids)))
        rng.shuffle(order)
        packed: list[list[int]] = []
        row: list[int] = []
        for i in order:
            if len(row) + len(ids[i]) > row_len:
                packed.append(row)
                row = []
            row = row + ids[i]
        # the last, partial row is dropped (as the zoo was trained: its models depend on it)
        if len(packed) < rows:  # a small corpus: repeat its rows to fill one batch
            packed = packed or [row]
            packed = (packed * (rows // len(packed) + 1))[:rows]
        for start in range(0, len(packed) - rows + 1, rows):
            x = torch.full((rows, row_len), pad, dtype=torch.long)
            m = torch.zeros((rows, row_len), dtype=torch.bool)
            for r, seq in enumerate(packed[start:start + rows]):
                x[r, :len(seq)] = torch.tensor(seq)
                m[r, :len(seq)] = True
            yield x, m


def warmup_cosine(step: int, lr: float, warmup: int, steps: int) -> float:
    """The learning rate at `step`: linear warm-up over `warmup` steps, then a cosine decay to
    5 % of `lr` at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
