"""`torch.nn.Module`s that hold the spec's parameters and compute with the spec's layers and ops.

Weights are stored in the spec's layouts — Linear's weight is (in, out), not torch's (out, in); wq is
(D, N, H) — so `Transformer.from_params` takes `tensorglot.init_params` output (or a checkpoint) as is
and `to_params` gives back the same names. A module's forward is the torch backend's
``layers.transformer`` (``block``, ``attention_layer``, ``ops.*``) on its own parameters, so the logits
equal the functional layers' and autograd flows through the kernels' Functions to the parameters.

>>> import tensorglot, torch
>>> from tensorglot_torch.nn import Transformer
>>> cfg = tensorglot.TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
...                                    head_dim=4, d_ff=32, max_seq_len=64)
>>> model = Transformer(cfg, seed=0)
>>> model(torch.tensor([[1, 2, 3]])).shape
torch.Size([1, 3, 32])
>>> sorted(model.to_params()) == sorted(tensorglot.init_params(cfg, 0))
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

import tensorglot
from tensorglot.params import TransformerConfig, check_params, init_params

from ._common import dtype_name


def _backend() -> Any:
    return tensorglot.get_backend("torch")


def _param(*shape: int, std: float, device: Any = None, dtype: Any = None) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, device=device, dtype=dtype) * std)


class Linear(nn.Module):
    """``x @ weight + bias`` with weight (in, out)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.weight = _param(d_in, d_out, std=d_in**-0.5, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _backend().ops.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """``act(x @ w_in) @ w_out``, no biases."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu", device: Any = None, dtype: Any = None):
        super().__init__()
        self.activation = activation
        self.w_in = _param(d_model, d_ff, std=d_model**-0.5, device=device, dtype=dtype)
        self.w_out = _param(d_ff, d_model, std=d_ff**-0.5, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _backend().ops.mlp(x, self.w_in, self.w_out, activation=self.activation)


class SwiGLU(nn.Module):
    """``(silu(x @ w_gate) * (x @ w_up)) @ w_down``."""

    def __init__(self, d_model: int, d_ff: int, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.w_gate = _param(d_model, d_ff, std=d_model**-0.5, device=device, dtype=dtype)
        self.w_up = _param(d_model, d_ff, std=d_model**-0.5, device=device, dtype=dtype)
        self.w_down = _param(d_ff, d_model, std=d_ff**-0.5, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _backend().ops.swiglu(x, self.w_gate, self.w_up, self.w_down)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _backend().ops.rms_norm(x, self.weight, eps=self.eps)


#: module attribute → spec parameter name, within layer i (``layers.{i}.<name>``)
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn.wq": "wq",
    "attn.wk": "wk",
    "attn.wv": "wv",
    "attn.wo": "wo",
    "mlp_norm.weight": "mlp_norm",
    "mlp.w_in": "w_in",
    "mlp.w_out": "w_out",
    "mlp.w_gate": "w_gate",
    "mlp.w_up": "w_up",
    "mlp.w_down": "w_down",
}


class _Layer(nn.Module):
    """A module of layer ``layer``: its parameters under their spec names, ``layers.{layer}.<name>``."""

    layer: int

    def spec_params(self, prefix: str = "") -> dict[str, nn.Parameter]:
        return {f"layers.{self.layer}.{_LAYER_NAMES[prefix + attr]}": p for attr, p in self.named_parameters()}


class MultiHeadAttention(_Layer):
    """Grouped-query self-attention of layer ``layer`` (`tensorglot.layers.Layers.attention_layer`)."""

    def __init__(self, config: TransformerConfig, *, layer: int = 0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        c, self.config, self.layer = config, config, layer
        D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = _param(D, N, H, std=D**-0.5, device=device, dtype=dtype)
        self.wk = _param(D, K, H, std=D**-0.5, device=device, dtype=dtype)
        self.wv = _param(D, K, H, std=D**-0.5, device=device, dtype=dtype)
        self.wo = _param(N, H, D, std=(N * H) ** -0.5, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """x (B, S, D) → (B, S, D); ``cache`` a ``layers.kv_cache`` on which ``reserve(S)`` was called."""
        params = self.spec_params("attn.")
        return _backend().layers.attention_layer(
            x, params, self.config, layer=self.layer, positions=positions, cache=cache
        )


class TransformerBlock(_Layer):
    """Pre-norm: ``h = x + attn(attn_norm(x))``, ``h + mlp(mlp_norm(h))`` (`Layers.block`)."""

    def __init__(self, config: TransformerConfig, layer: int, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        kw = dict(device=device, dtype=dtype)
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
        self.attn = MultiHeadAttention(config, layer=layer, **kw)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
        self.mlp: nn.Module = (
            SwiGLU(config.d_model, config.d_ff, **kw)
            if config.activation == "swiglu"
            else MLP(config.d_model, config.d_ff, activation=config.activation, **kw)
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        return _backend().layers.block(
            x, self.spec_params(), self.config, layer=self.layer, positions=positions, cache=cache
        )


class Transformer(nn.Module):
    """embed → blocks → norm → lm_head (or embed.T when tied); initialised as `tensorglot.init_params`."""

    def __init__(
        self, config: TransformerConfig, *, seed: int = 0, device: Any = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self._build(config, device=device, dtype=dtype)
        self.load_params(init_params(config, seed, dtype="float64"))

    def _build(self, config: TransformerConfig, **kw: Any) -> None:
        c = self.config = config
        self.embed = _param(c.vocab_size, c.d_model, std=c.d_model**-0.5, **kw)
        self.layers = nn.ModuleList(TransformerBlock(c, i, **kw) for i in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps, **kw)
        self.lm_head = None if c.tie_embeddings else _param(c.d_model, c.vocab_size, std=c.d_model**-0.5, **kw)

    def spec_params(self) -> dict[str, nn.Parameter]:
        """Spec name → this module's parameter (autograd flows to them)."""
        out = {"embed": self.embed}
        for blk in self.layers:
            out |= cast(TransformerBlock, blk).spec_params()
        out["norm"] = self.norm.weight
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head
        return out

    def to_params(self) -> dict[str, torch.Tensor]:
        """The spec's flat dict (detached tensors that share this module's storage)."""
        return {k: v.detach() for k, v in self.spec_params().items()}

    @torch.no_grad()
    def load_params(self, params: Mapping[str, Any]) -> None:
        """Copy a spec params dict (NumPy arrays or tensors) into this module, keeping its dtype and device."""
        check_params("Transformer.load_params", {k: tuple(v.shape) for k, v in params.items()}, self.config)
        for name, p in self.spec_params().items():
            p.copy_(torch.as_tensor(params[name]))

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], config: TransformerConfig, *, device: Any = None, dtype: Any = None
    ) -> Transformer:
        """A module holding ``params`` (dtype and device default to those of ``params["embed"]``)."""
        first = torch.as_tensor(params["embed"])
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._build(config, device=device or first.device, dtype=dtype or first.dtype)
        model.load_params(params)
        return model

    def forward(
        self, tokens: torch.Tensor, *, cache: Any = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, S) ints → logits (B, S, V); a cache continues what it holds, as `layers.transformer`."""
        return _backend().layers.transformer(tokens, self.spec_params(), self.config, cache=cache, positions=positions)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``targets`` (B, S) given ``tokens`` (B, S) (`layers.loss`)."""
        return _backend().layers.loss(tokens, targets, self.spec_params(), self.config)

    def kv_cache(self, batch: int, max_len: int, **kw: Any) -> Any:
        """`layers.kv_cache` for this model, in its dtype."""
        return _backend().layers.kv_cache(self.config, batch, max_len, dtype=dtype_name(self.embed), **kw)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, *, max_new_tokens: int, cache: str | None = "contiguous") -> torch.Tensor:
        """Greedy decoding, as `layers.generate` (the same tokens)."""
        return _backend().layers.generate(
            self.to_params(), self.config, prompt, max_new_tokens=max_new_tokens, cache=cache
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
