"""Sampling the next token from host logits: temperature, top-k, top-p, min-p, stop token ids, and a
per-request seed.

Sampling runs on the host, on the logits as NumPy float64 (``be.to_numpy(logits)``), so every backend
samples the same way from the same logits. The filters follow Hugging Face's order: temperature, then
top-k, then top-p, then min-p, each on the distribution the previous one left (renormalised):

* ``temperature`` T: p ∝ exp(logits / T). ``T == 0`` is greedy: the first maximum of the logits, exactly
  `tensorglot.layers.Layers.generate`'s choice, and draws no random number.
* ``top_k`` k (0: off): keep the k most probable tokens (ties: the lower id first, a stable sort).
* ``top_p`` p (1: off): keep the smallest set of most probable tokens whose mass is >= p (nucleus
  sampling, Holtzman et al. 2019, arXiv:1904.09751); the most probable token is always kept.
* ``min_p`` m (0: off): keep the tokens with probability >= m × the largest probability (Nguyen et al.
  2024, arXiv:2407.01082).

**Seeds.** Each `Sampler` owns a ``numpy.random.Generator`` seeded from the request's ``seed`` (and its
choice index, for ``n > 1``), and draws exactly one uniform number per sampled token, inverted through
the CDF of the filtered distribution in token-id order. So a request's tokens depend only on its own
logits and seed, never on what else shares the decode batch or in which row it sits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler and when it stops (``max_tokens`` and ``stop_token_ids``
    here; stop strings are text, see `tensorglot.serving.text`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def check(self, vocab_size: int) -> None:
        """Raise ValueError naming the first parameter out of range (the HTTP layer answers 400 with it)."""
        fn = "SamplingParams"
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"{fn}: max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"{fn}: temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"{fn}: top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{fn}: top_p must lie in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"{fn}: min_p must lie in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"{fn}: seed must be an integer >= 0 or None, got {self.seed!r}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{fn}: stop_token_ids must lie in [0, {vocab_size}), got {bad}")


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """(V,) float64: the distribution a token is drawn from, zeros where a filter removed it.

    ``logits`` (V,) any float; ``params.temperature`` must be > 0 (0 is greedy, see `Sampler`)."""
    if params.temperature <= 0:
        raise ValueError(f"filtered_probs: temperature must be > 0 (0 is greedy), got {params.temperature}")
    z = np.asarray(logits, dtype=np.float64) / params.temperature  # (V,)
    p = np.exp(z - np.max(z))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")  # most probable first, the lower id first on ties
    keep = np.zeros(p.shape, dtype=bool)
    k = p.size if params.top_k == 0 else min(params.top_k, p.size)
    kept = order[:k]
    if params.top_p < 1:
        cum = np.cumsum(p[kept]) / p[kept].sum()
        # The smallest prefix with mass >= top_p; rounding may leave the whole sum a hair below 1.
        kept = kept[: min(int(np.searchsorted(cum, params.top_p)) + 1, kept.size)]
    keep[kept] = True
    if params.min_p > 0:
        keep &= p >= params.min_p * p[order[0]]
    out = np.where(keep, p, 0.0)
    return out / out.sum()


class Sampler:
    """One request's (one choice's) token chooser: `__call__` takes the last logits (V,) and returns an id.

    ``seed`` None draws fresh entropy; ``choice`` seeds the n-th completion of one request differently."""

    def __init__(self, params: SamplingParams, *, choice: int = 0) -> None:
        self.params = params
        entropy: Sequence[int] | None = None if params.seed is None else (params.seed, choice)
        self.rng = np.random.default_rng(np.random.SeedSequence(entropy))

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(logits))  # the first maximum, as generate
        p = filtered_probs(logits, self.params)
        u = self.rng.random()  # exactly one draw per token: the stream depends on the token count only
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), np.flatnonzero(p)[-1]))
