"""The optimizers a parallel transformer step applies, elementwise so that any shard of a parameter (and
of its state) updates exactly as the same elements of the whole would: SGD and AdamW.

AdamW is PyTorch's ``torch.optim.AdamW`` (Loshchilov & Hutter, arXiv:1711.05101): decoupled weight decay
``w ← w·(1 − lr·λ)``, then ``w ← w − lr·m̂/(√v̂ + ε)`` with bias-corrected moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

Array = Any
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Optimizer:
    """An optimizer and its hyper-parameters; ``step`` counts the updates made before this one."""

    kind: str = "sgd"
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    @property
    def state_arrays(self) -> int:
        """How many arrays of a parameter's shape its state holds (AdamW: m and v)."""
        return 2 if self.kind == "adamw" else 0

    def update(self, w: Array, g: Array, m: Array | None, v: Array | None, step: int, /) -> tuple[Array, ...]:
        """(new w, new m, new v) for update number ``step + 1``; SGD keeps m and v None."""
        if self.kind == "sgd":
            return w - self.lr * g, None, None
        assert m is not None and v is not None, "AdamW needs its state"
        xp = array_namespace(w)
        b1, b2 = self.betas
        t = step + 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g * g)
        w = w * (1 - self.lr * self.weight_decay)
        w = w - self.lr * (m / (1 - b1**t)) / (xp.sqrt(v / (1 - b2**t)) + self.eps)
        return w, m, v


def check_optimizer(fn: str, kind: Any, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> Optimizer:
    """An `Optimizer` from a step's options, or a ValueError naming the option."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"{fn}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{fn}: {name} must be a number >= 0, got {value!r}")
    if (
        not isinstance(betas, tuple | list)
        or len(betas) != 2
        or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"{fn}: betas must be two numbers in [0, 1), got {betas!r}")
    return Optimizer(kind, float(lr), (float(betas[0]), float(betas[1])), float(eps), float(weight_decay))


def one_device_steps(
    layers: Any, params: dict[str, Array], config: Any, tokens: Any, targets: Any, optimizer: Optimizer, steps: int, /
) -> tuple[list[float], dict[str, Array], dict[str, Array]]:
    """``steps`` training steps on one device, ``layers.value_and_grad`` and ``optimizer`` on whole arrays:
    (the losses, the last step's gradients, the final parameters), what a parallel step must equal."""
    losses: list[float] = []
    m: dict[str, Array] = {}
    v: dict[str, Array] = {}
    grads: dict[str, Array] = {}
    for t in range(steps):
        loss, grads = layers.value_and_grad(tokens, targets, params, config)
        losses.append(float(loss))
        new = {}
        for k, w in params.items():
            zeros = array_namespace(w).zeros_like(w)
            new[k], m[k], v[k] = optimizer.update(w, grads[k], m.get(k, zeros), v.get(k, zeros), t)
        params = new
    return losses, grads, params
