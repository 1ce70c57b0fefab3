"""Per-request metrics and their summary (what `tensorglot serve --json` prints)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .goodput import percentile as _pct


def prompt_json(prompt: Any) -> Any:
    """A request's prompt as JSON-ready values, whatever the caller gave (a rejected one included)."""
    try:
        return np.asarray(prompt).tolist()
    except (ValueError, TypeError):
        return prompt if isinstance(prompt, list) else repr(prompt)


def request_record(
    req: Any,
    tokens: list[int],
    *,
    t_first: float,
    t_last: float,
    kv_bytes: int,
    transfer_s: float,
    prefill_s: float,
    worker: int,
    recomputed: bool,
    kv_digest_ok: bool,
    token_times: list[float] | None = None,
) -> dict[str, Any]:
    """TTFT = first token − arrival; TPOT = (end-to-end − TTFT) / (n − 1), None for n = 1; ``itl_s``, the
    gaps between the tokens' wall-clock ``token_times`` when the loop recorded them (else None)."""
    ttft, e2e, n = t_first - req.arrival, t_last - req.arrival, len(tokens)
    return {
        "id": req.rid,
        "prompt": prompt_json(req.prompt),
        "tokens": [int(t) for t in tokens],
        "ttft_s": ttft,
        "tpot_s": (e2e - ttft) / (n - 1) if n > 1 else None,
        "e2e_s": e2e,
        "kv_bytes": int(kv_bytes),
        "transfer_s": transfer_s,
        "prefill_s": prefill_s,
        "worker": worker,
        "recomputed": recomputed,
        "kv_digest_ok": kv_digest_ok,
        "itl_s": None if token_times is None else np.diff(token_times).tolist(),
        "error": None,
    }


def rejected_record(req: Any, error: str) -> dict[str, Any]:
    return {
        "id": req.rid,
        "prompt": prompt_json(req.prompt),
        "tokens": [],
        "ttft_s": None,
        "tpot_s": None,
        "e2e_s": None,
        "kv_bytes": 0,
        "transfer_s": None,
        "prefill_s": None,
        "worker": None,
        "recomputed": False,
        "kv_digest_ok": None,
        "itl_s": None,
        "error": error,
    }


def summarize(records: list[dict[str, Any]], *, mode: str, wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r["error"] is None]
    ttft = [r["ttft_s"] for r in ok]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    itl = [g for r in ok for g in r.get("itl_s") or ()]  # every gap between two tokens of one request
    share = [r["transfer_s"] / r["ttft_s"] for r in ok if r["ttft_s"]]
    tokens = sum(len(r["tokens"]) for r in ok)
    return {
        "mode": mode,
        "requests": len(records),
        "completed": len(ok),
        "rejected": len(records) - len(ok),
        "recomputed": sum(bool(r["recomputed"]) for r in ok),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_s": _pct(tpot, 50),
        "tpot_p99_s": _pct(tpot, 99),
        "itl_p50_s": _pct(itl, 50),
        "itl_p99_s": _pct(itl, 99),
        "transfer_share_of_ttft_p50": _pct(share, 50),
        "kv_bytes": sum(r["kv_bytes"] for r in ok),
        "generated_tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
    }
