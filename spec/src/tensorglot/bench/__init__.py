"""``tensorglot bench``: one benchmark suite that runs on any backend through its public API.

Like the conformance suite, the rows live here (`rows.GROUPS`, by name) and call only ``be.ops``, ``be.encodings``,
``be.layers``, ``be.parallel``, ``be.asarray``/``to_numpy``; a row a backend cannot run (a missing
capability, no baseline) is skipped or has no baseline, never an error. Row names are dotted
``area.what.how``: ``ops.<op>.fwd_bwd``, ``mlp.flops_vs_matmul``, ``flash.time_vs_naive``,
``flash.peak_memory_vs_naive``, ``generate.cached_vs_recompute``, ``train.value_and_grad``,
``parallel.<strategy>.step_vs_single``, ``serving.<metric>.disagg_vs_coloc``. Times are medians of >= 5
runs after a warm-up, ours and the baseline alternating (`paired_medians`); a serving row is the median of
`rows.SERVING_RUNS` whole runs of its workload in each mode, alternating; never a timed assertion.

A backend's plugin contributes only baselines and probes, through the hook
``tensorglot_register_bench_baselines(register)``: ``register(backend, loader)``, where ``loader()``
(called only when that backend is benchmarked, so the plugin imports no framework) returns a dict:
  * ``row name -> (label, make)``: ``make(*args)`` gets the row's own arguments and returns a zero-argument
    callable running the baseline once (``ops.softmax.fwd_bwd -> ("torch.softmax", ...)``);
  * ``"sync"``: ``sync(out)`` waits for ``out`` (asynchronous frameworks); ``"jit"``: how the framework
    compiles a function (applied to ours in the op rows); ``"peak_memory"``: ``probe(fn, *args) -> bytes``
    allocated at the peak of ``fn(*args)`` (default: tracemalloc, which NumPy reports to).
  * ``"serial"``: a context-manager factory under which the framework runs one intra-op thread (the
    generate row, whose ~100 tiny ops a step would otherwise time the scheduler); default: no change.

JSON (``--json PATH``, schema ``tensorglot.bench/1``)::

    {"schema": "tensorglot.bench/1", "quick": bool,
     "machine": {"date", "platform", "cpus", "python", "numpy", "matmul_gflops", "bandwidth_gbs"},
     "backend": {"name", "framework", "version", "repr", "capabilities"},
     "rows": [{"name": "ops.softmax.fwd_bwd", "value": 0.0123 | null (skipped), "unit": "s",
               "ratio": value / baseline.value | null, "target": "<= 1.3" | null, "met": bool | null,
               "baseline": {"name": "torch.softmax", "value": 0.0101} | null,
               "details": {"shapes": "...", "skipped": "why", ...}}]}

``--quick`` runs small sizes without targets; ``--compare OLD.json`` prints each row's value new ÷ old.
"""

from __future__ import annotations

from .cli import configure as configure
from .cli import run as run
from .harness import Context as Context
from .harness import measure_machine as measure_machine
from .rows import generate_times as generate_times
from .rows import mlp_times as mlp_times
