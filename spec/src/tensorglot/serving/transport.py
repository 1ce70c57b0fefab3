"""How serving ranks talk: the `Transport` a plugin provides, and the messages the spec sends over it.

A message is a fixed header, ``HEADER`` int64 values ``[kind, rid, ...fields]``, then the NumPy arrays
its kind implies (`payload_spec`: their shapes and dtypes are in the header, so a receiver can allocate
them before they arrive). A KV message carries ``k_0, v_0, k_1, v_1, ...`` — one layer after another —
and a BLAKE2b `digest` of their bytes, which the decode worker checks: the KV it holds is what prefill
computed, bit for bit, whatever the transport.

Kinds and their fields (after kind, rid):
  REQUEST  prompt_len, max_new, decode, sampling_len, seq, supplied
           payload: prompt (P,) int64 (decode: where the KV goes; seq: its place in that decode worker's
           order of prefix-cache operations, -1 without prefix caching; supplied: the prompt tokens whose
           KV the decode worker holds, which are not sent)
           [, sampling (sampling_len,) float64: `pack_sampling`, for a server's sampled request]
  KV       prompt_len, max_new, first_token, dtype, n_layers, K, H, sent_us, digest, prefill_us, worker,
           sampling_len, V, cached (prompt tokens the prefill worker's prefix cache gave), supplied, seq
           payload: k_0, v_0, k_1, v_1, ... each (P - supplied, K, H) of dtype (the digest covers the whole
           (P, K, H) KV), prompt (P,) int64 [, sampling, logits (V,) float64: the prompt's last logits,
           which the decode worker samples the first token from]
  RECEIVED worker                                      (decode → router: request rid's KV arrived)
  DONE     n, first_us, last_us, kv_bytes, transfer_us, prefill_us, worker, digest_ok, digest, cached,
           supplied, kv_bytes_saved                    payload: tokens (n,) int64, their wall-clock times
                                                       (n,) int64 µs (the first: the KV's arrival)
  TOKEN    n                                           payload: the request's next n tokens (n,) int64
                                                       (decode → router, for a server's streamed request)
  CANCEL                                               (router → decode: drop the request)
  SKIP     seq                                         (router → decode: no KV will come for seq)
  DEAD     worker                                      (router → decode: stop listening to it)
  STOP                                                 (no more requests)
  READY                                                (worker → router: model loaded, warmed up)
  BEAT                                                 (worker → router, every `beat_s`: alive)

Transports come from plugins (`tensorglot.hookspecs.tensorglot_register_transports`); `get_transport`
looks one up by name. tensorglot-torch provides ``"torch"`` (``torch.distributed``: gloo on CPU, NCCL
when every rank has its own GPU).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from .sampling import SamplingParams

HEADER = 20
REQUEST, KV, RECEIVED, DONE, DEAD, STOP, READY, BEAT, TOKEN, CANCEL, SKIP = range(1, 12)
DTYPES = ("float32", "float64", "float16")  # what `Backend.to_numpy` gives (bfloat16 is widened)

PayloadSpec = Callable[[list[int]], list[tuple[tuple[int, ...], str]]]


class Message(NamedTuple):
    """What `Transport.recv` returns. A source whose connection failed or whose payload timed out
    gives one message with ``header`` None and the reason in ``error``; nothing more comes from it."""

    src: int
    header: list[int] | None
    payload: list[np.ndarray]
    t_recv: float  # wall clock (time.time) when the whole message had arrived
    error: str | None = None


class Transport(Protocol):
    """Point-to-point messages between the ranks of one serving run (rank 0 is the router).

    Every transfer has ``timeout_s``: a peer that dies raises inside the transport and a peer that
    stops answering times out; either is reported (`failures`, an error `Message`), never raised into
    the caller's loop.
    """

    rank: int
    world_size: int

    def listen(self, sources: Sequence[int], /) -> None:
        """Start receiving from ``sources``: each message is a header, then exactly the payload that
        ``payload_spec(header)`` announces (messages from one source arrive in the order sent)."""
        ...

    def send(self, dst: int, header: np.ndarray, arrays: Sequence[np.ndarray] = (), /) -> None:
        """Queue the header and then each array, in order, for ``dst``, and return at once (a rank never
        blocks on a send, so two ranks that send to each other cannot deadlock). Safe to call from
        several threads (the heartbeat sends from its own)."""
        ...

    def recv(self, timeout: float, /) -> Message | None:
        """The next message from a listened source, or None after ``timeout`` seconds."""
        ...

    def drop(self, src: int, /) -> None:
        """Ignore ``src`` from now on (a worker declared dead)."""
        ...

    def failures(self) -> set[int]:
        """Destinations whose sends failed or timed out since the last call (each reported once)."""
        ...

    def barrier(self) -> None:
        """Wait until every rank reached this point (all models loaded: the clock starts)."""
        ...

    def drain(self, timeout: float, /) -> None:
        """Wait until every send to a live destination completed, at most ``timeout`` seconds."""
        ...


#: ``factory(rank, world_size, *, address, timeout_s, payload_spec)`` → a `Transport`.
TransportFactory = Callable[..., Transport]


def get_transport(name: str | None = None) -> TransportFactory:
    """The factory a plugin registered as ``name``; None takes ``"torch"`` if installed, else any."""
    from ..registry import registry

    found = registry().transports()
    if name is None:
        name = "torch" if "torch" in found or not found else sorted(found)[0]
    if name not in found:
        have = ", ".join(sorted(found)) or "none"
        hint = " It is provided by `pip install tensorglot-torch`." if name == "torch" else ""
        raise ValueError(f"get_transport: unknown transport {name!r}; installed transports: {have}.{hint}")
    return found[name].factory


def now_us() -> int:
    return time.time_ns() // 1000


def header(kind: int, rid: int = -1, *fields: int) -> np.ndarray:
    values = [kind, rid, *fields]
    h = np.zeros(HEADER, dtype=np.int64)
    h[: len(values)] = values
    return h


def digest(arrays: Sequence[np.ndarray]) -> int:
    """63 bits of BLAKE2b over the arrays' bytes: equal digests mean bit-identical KV."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def payload_spec(h: list[int]) -> list[tuple[tuple[int, ...], str]]:
    """The shapes and dtype names of the arrays that follow header ``h``."""
    kind = h[0]
    if kind == REQUEST:
        spec: list[tuple[tuple[int, ...], str]] = [((h[2],), "int64")]
        return spec + ([((h[5],), "float64")] if h[5] else [])
    if kind == DONE:
        return [((h[2],), "int64"), ((h[2],), "int64")]
    if kind == TOKEN:
        return [((h[2],), "int64")]
    if kind == KV:
        P, dt, L, K, H, S, V, supplied = h[2], h[5], h[6], h[7], h[8], h[13], h[14], h[16]
        kv: list[tuple[tuple[int, ...], str]] = [((P - supplied, K, H), DTYPES[dt])] * (2 * L) + [((P,), "int64")]
        return kv + ([((S,), "float64"), ((V,), "float64")] if S else [])
    return []


def pack_sampling(params: SamplingParams, choice: int) -> np.ndarray:
    """A server job's sampling as float64 values (exact for the ints): max_tokens, temperature, top_k,
    top_p, min_p, seed (-1: none), choice, then the stop token ids."""
    seed = -1 if params.seed is None else params.seed
    head = [params.max_tokens, params.temperature, params.top_k, params.top_p, params.min_p, seed, choice]
    return np.asarray([*head, *params.stop_token_ids], dtype=np.float64)


def unpack_sampling(values: np.ndarray) -> tuple[SamplingParams, int]:
    """`pack_sampling`'s inverse: the params and the choice index."""
    v = values.tolist()
    seed = None if v[5] < 0 else int(v[5])
    stops = tuple(int(x) for x in v[7:])
    return SamplingParams(int(v[0]), v[1], int(v[2]), v[3], v[4], seed, stops), int(v[6])
