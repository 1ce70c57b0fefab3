"""PyTorch layers: see the spec, `tensorglot.layers`. Built from the ops' autograd Functions, so
`value_and_grad` is autograd through them (plus the embedding and cross-entropy Functions below); the
modules of `tensorglot_torch.nn` call the same helpers."""

from __future__ import annotations

import torch

from tensorglot import checks
from tensorglot.cache import check_cache, visible_mask
from tensorglot.params import TransformerConfig, check_params, check_tokens

from ._common import Frontend, as_int, compute_dtype, dtype_name, same_device
from .cache import kv_cache

ops, encodings = Frontend("ops"), Frontend("encodings")  # the spec's front ends of this backend

__all__ = ["attention_layer", "mlp_layer", "block", "transformer", "generate", "kv_cache", "value_and_grad"]


# -- the two Functions the ops do not have: embedding lookup and the loss --------------------------


class Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, embed):
        ctx.save_for_backward(tokens)
        ctx.vocab = embed.shape[0]
        return embed[tokens]  # (B, S, D)

    @staticmethod
    def backward(ctx, dx):
        (tokens,) = ctx.saved_tensors
        dembed = dx.new_zeros(ctx.vocab, dx.shape[-1])
        dembed.index_add_(0, tokens.reshape(-1), dx.reshape(-1, dx.shape[-1]))  # a repeated token adds up
        return None, dembed


class CrossEntropy(torch.autograd.Function):
    """The mean of −log softmax(logits)[target] over (B, S), max-subtracted, in float32 for half inputs."""

    @staticmethod
    def forward(ctx, logits, targets):
        z = logits.to(compute_dtype(logits.dtype))
        lse = torch.logsumexp(z, -1, keepdim=True)  # (B, S, 1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse[..., 0] - z.gather(-1, targets[..., None])[..., 0]).mean().to(logits.dtype)

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        dz = torch.exp(logits.to(lse.dtype) - lse)  # softmax
        dz.scatter_add_(-1, targets[..., None], torch.full_like(lse, -1.0))  # − onehot(target)
        return dz.mul_(dloss.to(lse.dtype) / targets.numel()).to(logits.dtype), None


# -- validation ------------------------------------------------------------------------------------


def _check_model(fn, params, config):
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{fn}: config must be a TransformerConfig, got {type(config).__name__}")
    check_params(fn, {k: tuple(v.shape) for k, v in params.items()}, config)
    dtypes = {dtype_name(v) for v in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in checks.FLOAT_DTYPES:
        raise TypeError(f"{fn}: params must share one float dtype, got {sorted(dtypes)}")
    same_device(fn, **params)


def _tokens(fn, arg, tokens, config, device, start=0):
    tokens = as_int(fn, arg, tokens, device=device)
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
    check_tokens(fn, arg, tuple(tokens.shape), lo, hi, config, start=start)
    same_device(fn, **{arg: tokens, "params": torch.empty(0, device=device)})
    return tokens.long()


def _layer(fn, layer, config):
    layer = checks.check_positive_int(fn, "layer", layer, allow_zero=True)
    if layer >= config.n_layers:
        raise ValueError(f"{fn}: layer must be in [0, {config.n_layers}), got {layer}")
    return layer


def _positions(fn, positions, B, S, config, device):
    positions = as_int(fn, "positions", positions, device=device)
    if tuple(positions.shape) not in ((S,), (B, S)):
        raise checks.bad_shape(fn, "positions", tuple(positions.shape), f"(S,) = ({S},) or (B, S) = ({B}, {S})")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= config.max_seq_len):
        raise ValueError(
            f"{fn}: positions must lie in [0, max_seq_len) = [0, {config.max_seq_len}), "
            f"got [{int(positions.min())}, {int(positions.max())}]"
        )
    return positions.to(device)


def _check_x(fn, x, params, config):
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[2] != config.d_model:
        raise checks.bad_shape(fn, "x", tuple(getattr(x, "shape", ())), f"(B, S, D) with D = {config.d_model}")
    if x.dtype != params["embed"].dtype:
        raise TypeError(f"{fn}: x has dtype {dtype_name(x)}, the params {dtype_name(params['embed'])}")
    same_device(fn, x=x, params=params["embed"])
    return x


def _step_positions(fn, positions, cache, B, S, config, device):
    if positions is not None:
        return _positions(fn, positions, B, S, config, device)
    if cache is None:
        return torch.arange(S, device=device)
    start = torch.from_numpy(cache.lengths()).to(device)
    return start[:, None] + torch.arange(S, device=device)  # (B, S): each sequence continues where it is


# -- the layers, on explicit weights (shared with tensorglot_torch.nn) -------------------------------


def rope(x, positions, config):
    return encodings.rope(
        x,
        positions=positions,
        theta=config.rope_theta,
        style=config.rope_style,
        rotary_dim=config.rotary_dim,
        scaling=config.rope_scaling,
    )


def attend(x, wq, wk, wv, wo, config, positions, cache=None, layer=0):
    """`attention_layer` on explicit weights: wq (D, N, H), wk and wv (D, K, H), wo (N, H, D)."""
    B, S, D = x.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
    q = ops.linear(x, wq.reshape(D, N * H)).view(B, S, N, H)  # (B, S, N, H)
    k = ops.linear(x, wk.reshape(D, K * H)).view(B, S, K, H)  # (B, S, K, H)
    v = ops.linear(x, wv.reshape(D, K * H)).view(B, S, K, H)
    q, k = rope(q, positions, config), rope(k, positions, config)  # never v
    if cache is None:
        y = ops.attention(q, k, v, causal=True)
    else:
        k_all, v_all = cache.update(layer, k, v)  # (B, T, K, H), keys stored after RoPE
        mask = torch.from_numpy(visible_mask(cache.lengths(), S, k_all.shape[1])).to(x.device)  # (B, 1, S, T)
        y = ops.attention(q, k_all, v_all, mask=mask)
    return ops.linear(y.reshape(B, S, N * H), wo.reshape(N * H, D))  # (B, S, D)


def feed_forward(x, weights, config):
    """`mlp_layer` on explicit weights: (w_in, w_out), or (w_gate, w_up, w_down) for swiglu."""
    if config.activation == "swiglu":
        return ops.swiglu(x, *weights)
    return ops.mlp(x, *weights, activation=config.activation)


def _mlp_weights(params, prefix, config):
    names = ("w_gate", "w_up", "w_down") if config.activation == "swiglu" else ("w_in", "w_out")
    return [params[prefix + n] for n in names]


def _block(x, params, config, positions, cache, layer):
    p = f"layers.{layer}."
    a = ops.rms_norm(x, params[p + "attn_norm"], eps=config.norm_eps)
    h = x + attend(
        a, params[p + "wq"], params[p + "wk"], params[p + "wv"], params[p + "wo"], config, positions, cache, layer
    )
    m = ops.rms_norm(h, params[p + "mlp_norm"], eps=config.norm_eps)
    return h + feed_forward(m, _mlp_weights(params, p, config), config)


def attention_layer(x, params, config, /, *, layer, positions=None, cache=None):
    fn = "attention_layer"
    _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    layer = _layer(fn, layer, config)
    if cache is not None:
        check_cache(fn, cache, x.shape[0], config)
    positions = _step_positions(fn, positions, cache, x.shape[0], x.shape[1], config, x.device)
    p = f"layers.{layer}."
    wq, wk, wv, wo = (params[p + n] for n in ("wq", "wk", "wv", "wo"))
    return attend(x, wq, wk, wv, wo, config, positions, cache, layer)


def mlp_layer(x, params, config, /, *, layer):
    fn = "mlp_layer"
    _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    layer = _layer(fn, layer, config)
    return feed_forward(x, _mlp_weights(params, f"layers.{layer}.", config), config)


def block(x, params, config, /, *, layer, positions=None, cache=None):
    fn = "block"
    _check_model(fn, params, config)
    x = _check_x(fn, x, params, config)
    layer = _layer(fn, layer, config)
    if cache is not None:
        check_cache(fn, cache, x.shape[0], config)
    positions = _step_positions(fn, positions, cache, x.shape[0], x.shape[1], config, x.device)
    return _block(x, params, config, positions, cache, layer)


def logits_weight(params, config):
    return params["embed"].T if config.tie_embeddings else params["lm_head"]  # (D, V)


def _forward(tokens, params, config, positions, cache):
    x = Embedding.apply(tokens, params["embed"])  # (B, S, D)
    for i in range(config.n_layers):
        x = _block(x, params, config, positions, cache, i)
    n = ops.rms_norm(x, params["norm"], eps=config.norm_eps)
    return ops.linear(n, logits_weight(params, config))  # (B, S, V)


def transformer(tokens, params, config, /, *, cache=None, positions=None):
    fn = "transformer"
    _check_model(fn, params, config)
    device = params["embed"].device
    start = 0
    if cache is not None:
        check_cache(fn, cache, tokens.shape[0] if getattr(tokens, "ndim", 0) else 0, config)
        start = int(cache.lengths().max())
    tokens = _tokens(fn, "tokens", tokens, config, device, start)
    B, S = tokens.shape
    positions = _step_positions(fn, positions, cache, B, S, config, device)
    if cache is None:
        return _forward(tokens, params, config, positions, None)
    cache.reserve(S)  # raises past capacity before anything is written
    logits = _forward(tokens, params, config, positions, cache)
    cache.advance(S)
    return logits


def check_generate(fn, prompt, config, max_new_tokens, cache, device):
    prompt = _tokens(fn, "prompt", prompt, config, device)
    new = checks.check_positive_int(fn, "max_new_tokens", max_new_tokens, allow_zero=True)
    P = prompt.shape[1]
    if P + new > config.max_seq_len:
        raise ValueError(f"{fn}: prompt length {P} + max_new_tokens {new} > max_seq_len = {config.max_seq_len}")
    if cache is not None:
        checks.check_choice(fn, "cache", cache, ("contiguous", "paged"))
    return prompt, new


@torch.no_grad()
def generate(params, config, prompt, /, *, max_new_tokens, cache="contiguous"):
    fn = "generate"
    _check_model(fn, params, config)
    device = params["embed"].device
    out_dtype = prompt.dtype if isinstance(prompt, torch.Tensor) else None
    prompt, new = check_generate(fn, prompt, config, max_new_tokens, cache, device)
    B, P = prompt.shape
    out = torch.empty(B, P + new, dtype=torch.long, device=device)
    out[:, :P] = prompt
    if cache is None:
        for t in range(P, P + new):
            out[:, t] = _forward(out[:, :t], params, config, torch.arange(t, device=device), None)[:, -1].argmax(-1)
    elif new:
        c = kv_cache(config, B, P + new, kind=cache, dtype=dtype_name(params["embed"]))
        logits = transformer(prompt, params, config, cache=c)
        for t in range(P, P + new):
            out[:, t] = logits[:, -1].argmax(-1)  # the first maximum on ties
            if t + 1 < P + new:
                logits = transformer(out[:, t : t + 1], params, config, cache=c)
    return out if out_dtype is None else out.to(out_dtype)


# -- training --------------------------------------------------------------------------------------


def loss(tokens, targets, params, config):
    """The mean next-token cross-entropy, differentiable with autograd (inputs already validated)."""
    logits = _forward(tokens, params, config, torch.arange(tokens.shape[1], device=tokens.device), None)
    return CrossEntropy.apply(logits, targets)


def value_and_grad(tokens, targets, params, config, /):
    fn = "value_and_grad"
    _check_model(fn, params, config)
    device = params["embed"].device
    tokens = _tokens(fn, "tokens", tokens, config, device)
    targets = _tokens(fn, "targets", targets, config, device)
    checks.check_same_shape(fn, "targets", tuple(targets.shape), tuple(tokens.shape), "tokens")
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        value = loss(tokens, targets, leaves, config)
        grads = torch.autograd.grad(value, list(leaves.values()))
    return value.detach(), dict(zip(leaves, grads))
