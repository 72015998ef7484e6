"""Synthetic training batches for MediCLIP: a new anomaly on every shot at every step.

Each epoch visits the training shots in a random order (torch.Generator), `batch_size` at a time; sample i
of epoch e is `Synthesizer.seeded(i, seed, e)`, so batches do not depend on timing or threads. The next batch
is synthesised on a background thread while the model works on the current one (numpy/scipy and torch both
release the GIL for their heavy parts). Images go through the reference's path: grey uint8 -> /255 ->
3 channels -> CLIP mean/std (the run's PreprocessSpec).

The held-out set of `--select-on valid` is fixed: `per_shot` synthetic samples of each held-out normal shot
(its own CutPaste sources), drawn from a seed stream training never uses.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from madclip_runtime.preprocess import PreprocessSpec, normalize_array

from ...synthesis import Synthesizer

HOLDOUT_EPOCH = 1_000_000  # seed stream of the fixed held-out synthetic set (training epochs are < this)


def to_model_input(grey: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [N, S, S] -> float32 [N, 3, S, S] normalised per spec."""
    x = grey.astype(np.float32) / 255.0
    return normalize_array(np.repeat(x[:, None], 3, axis=1), spec)


def build_batch(synth: Synthesizer, shot_indices: Sequence[int], seed: int, epoch: int, spec: PreprocessSpec):
    """-> (images float32 [b, 3, S, S], labels long [b] (1 = any anomaly), masks float32 [b, S, S] in [0, 1])."""
    samples = [synth.seeded(int(i), seed, epoch) for i in shot_indices]
    images = to_model_input(np.stack([s.image for s in samples]), spec)
    masks = np.stack([s.label for s in samples]).astype(np.float32)
    labels = np.array([int(s.label.any()) for s in samples], dtype=np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(masks)


class SynthBatches:
    """The MediCLIP training source: `len()` images per epoch, `batches(epoch, generator)` yields batches."""

    def __init__(
        self, synth: Synthesizer, seed: int, batch_size: int, spec: PreprocessSpec, prefetch: bool = True
    ):
        self.synth, self.seed, self.batch_size, self.spec, self.prefetch = (
            synth,
            int(seed),
            int(batch_size),
            spec,
            prefetch,
        )

    def __len__(self) -> int:
        return len(self.synth)

    def batches(
        self, epoch: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.synth), generator=generator).tolist()
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if not self.prefetch:
            for c in chunks:
                yield build_batch(self.synth, c, self.seed, epoch, self.spec)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth") as pool:
            pending = pool.submit(build_batch, self.synth, chunks[0], self.seed, epoch, self.spec)
            for k in range(len(chunks)):
                batch = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(build_batch, self.synth, chunks[k + 1], self.seed, epoch, self.spec)
                yield batch


def holdout_set(synth: Synthesizer, seed: int, per_shot: int, spec: PreprocessSpec):
    """Fixed synthetic samples of every shot of `synth`: (images, labels, masks) as build_batch, per_shot * k."""
    parts = [build_batch(synth, range(len(synth)), seed, HOLDOUT_EPOCH + j, spec) for j in range(per_shot)]
    return tuple(torch.cat(p) for p in zip(*parts))
