"""Draw one synthetic training sample: pick a task by its probability, apply it to a normal shot.

`Synthesizer(shots, mix)` holds the k normal shots as grey uint8 [S, S] arrays (also the CutPaste sources)
and the task mixture. `sample(index, rng)` uses the Generator it is given; `seeded(index, seed, epoch)`
derives that Generator from SeedSequence((seed, epoch, index)), so a sample depends only on those three
numbers: the same in any DataLoader worker, in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from madclip_runtime.errors import MadclipError

from .tasks import TASKS

DEFAULT_MIX: tuple[tuple[str, float], ...] = (
    ("cutpaste", 0.25),
    ("gauss", 0.25),
    ("source", 0.25),
    ("identity", 0.25),
)


def parse_mix(text: str | Sequence[str] | None) -> tuple[tuple[str, float], ...]:
    """'cutpaste=0.5,gauss,source' or ['cutpaste=0.5', 'gauss'] -> normalised ((name, p), ...).

    Names without a weight weigh 1 when no weight is given at all, otherwise they share what the explicit
    weights leave of 1 (error if nothing is left). None -> the reference's mixture.
    """
    if text is None:
        return DEFAULT_MIX
    items = [
        t for part in ([text] if isinstance(text, str) else text) for t in part.replace(",", " ").split()
    ]
    if not items:
        raise MadclipError("--tasks: no task names given")
    named: dict[str, float | None] = {}
    for item in items:
        name, _, weight = item.partition("=")
        name = name.strip().lower()
        if name not in TASKS:
            raise MadclipError(f"--tasks: unknown task {name!r} (known: {', '.join(TASKS)})")
        if name in named:
            raise MadclipError(f"--tasks: task {name!r} given twice")
        try:
            w = float(weight) if weight else None
        except ValueError:
            raise MadclipError(f"--tasks: weight of {name!r} is not a number: {weight!r}") from None
        if w is not None and not (w >= 0 and np.isfinite(w)):
            raise MadclipError(f"--tasks: weight of {name!r} must be >= 0, got {weight}")
        named[name] = w
    given = [w for w in named.values() if w is not None]
    if not given:
        weights = {n: 1.0 for n in named}
    else:
        missing = [n for n, w in named.items() if w is None]
        rest = 1.0 - sum(given)
        if missing and rest <= 0:
            raise MadclipError(
                f"--tasks: the explicit weights sum to {sum(given):g}, nothing left for {', '.join(missing)}"
            )
        weights = {n: (w if w is not None else rest / len(missing)) for n, w in named.items()}
    total = sum(weights.values())
    if total <= 0:
        raise MadclipError("--tasks: all weights are zero")
    return tuple((n, w / total) for n, w in weights.items())


def format_mix(mix: Sequence[tuple[str, float]]) -> str:
    return ",".join(f"{n}={p:g}" for n, p in mix)


@dataclass
class SynthSample:
    """image uint8 [S, S] (grey), label float32 [S, S] in [0, 1], task name, number of anomalies."""

    image: np.ndarray
    label: np.ndarray
    task: str
    rounds: int
    shot: int


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The Generator of sample `index` in `epoch` of a run seeded `seed` (independent streams)."""
    return np.random.default_rng(np.random.SeedSequence((int(seed), int(epoch), int(index))))


class Synthesizer:
    """Anomaly synthesis over a fixed set of normal shots (grey uint8 [S, S], all the same size)."""

    def __init__(self, shots: Sequence[np.ndarray], mix: Sequence[tuple[str, float]] = DEFAULT_MIX) -> None:
        if not shots:
            raise MadclipError("anomaly synthesis needs at least one normal image")
        self.shots = [np.ascontiguousarray(s) for s in shots]
        for s in self.shots:
            if s.dtype != np.uint8 or s.ndim != 2 or s.shape != self.shots[0].shape:
                raise ValueError(f"shots must be grey uint8 [S, S] of one size, got {s.dtype} {s.shape}")
        self.mix = tuple((str(n), float(p)) for n, p in mix)
        self.tasks = [TASKS[n]() for n, _ in self.mix]
        self.probs = np.array([p for _, p in self.mix], dtype=np.float64)
        self.probs = self.probs / self.probs.sum()

    def __len__(self) -> int:
        return len(self.shots)

    def sample(self, index: int, rng: np.random.Generator) -> SynthSample:
        """Apply a task drawn from the mixture to shot `index`."""
        t = int(rng.choice(len(self.tasks), p=self.probs))
        res = self.tasks[t](self.shots[index], rng, self.shots)
        return SynthSample(res.image, res.label.astype(np.float32), self.mix[t][0], res.rounds, int(index))

    def seeded(self, index: int, seed: int, epoch: int = 0) -> SynthSample:
        return self.sample(index, sample_rng(seed, epoch, index))
