"""JAX strategies on a Mesh: HLO byte counting, dp×tp on a 2-D mesh, device limits, bfloat16 on XLA:CPU.

The fake CPU devices need XLA_FLAGS before JAX initialises, so every test that runs JAX does so in a
fresh interpreter (the ``run_python`` fixture); parsing HLO text needs no devices and runs here.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

jp = pytest.importorskip("tensorglot_jax.parallel")

pytestmark = pytest.mark.distributed


def _env(devices: int) -> dict[str, str]:
    return {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }


@pytest.mark.timeout(240)
def test_dp_tp_on_a_two_dimensional_mesh_with_explicit_axes(run_python):
    code = """
import json, numpy as np, jax
from jax.sharding import AxisType
from tensorglot import parallel as P
from tensorglot_jax import parallel as jp
shape = P.MLPShape(layers=2, batch=8, d_model=4, d_ff=8)
params, x, dy = P.init_mlp(shape, seed=2)
f32 = lambda a: a.astype(np.float32)
got = jp.step({k: f32(v) for k, v in params.items()}, f32(x), f32(dy), strategy="dp_tp", world_size=4, tp_size=2)
one = jp.single_step({k: f32(v) for k, v in params.items()}, f32(x), f32(dy))
(_, shardings, _), = jp._COMPILED.values()  # the one program compiled: its mesh
mesh = shardings[0].mesh
print(json.dumps({
    "axes": list(mesh.axis_names), "shape": list(mesh.devices.shape),
    "types": [str(t) for t in mesh.axis_types],
    "bytes": list(got.bytes_by_rank), "model": list(P.step_cost("dp_tp", shape, 4, tp_size=2).bytes_by_rank),
    "groups": sorted({c.group_size for c in got.collectives}),
    "err": max(float(np.abs(got.grads[k] - one.grads[k]).max()) for k in params),
}))
"""
    out = run_python(code, env=_env(4), timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["axes"] == ["d", "t"] and r["shape"] == [2, 2]
    assert r["types"] == ["Explicit", "Explicit"] or all("Explicit" in t for t in r["types"])
    assert r["bytes"] == r["model"]
    assert r["groups"] == [2]
    assert r["err"] < 1e-5


@pytest.mark.timeout(120)
def test_more_ranks_than_devices_is_an_error_before_compiling(run_python):
    code = """
import numpy as np
from tensorglot import parallel as P
from tensorglot_jax import parallel as jp
params, x, dy = P.init_mlp(P.MLPShape(layers=4, batch=8, d_model=4, d_ff=8))
try:
    jp.step(params, x.astype(np.float32), dy, strategy="dp", world_size=4)
except ValueError as e:
    print("ERROR", e)
print("compiled", len(jp._COMPILED))
"""
    out = run_python(code, env=_env(2), timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ERROR step: world_size = 4 is more than the 2 JAX devices" in out.stdout
    assert "--xla_force_host_platform_device_count=4" in out.stdout
    assert "compiled 0" in out.stdout


@pytest.mark.timeout(240)
def test_xla_cpu_sends_bfloat16_collectives_as_float32(run_python):
    # XLA:CPU's all-reduce-promotion (and bf16 normalisation) widen bfloat16 collectives to float32, so the
    # compiled module moves twice the model's bytes; on GPU they stay bfloat16. The numbers stay right.
    code = """
import json, numpy as np, jax.numpy as jnp
from tensorglot import parallel as P
from tensorglot_jax import parallel as jp
shape = P.MLPShape(layers=2, batch=8, d_model=4, d_ff=8, dtype="bfloat16")
params, x, dy = P.init_mlp(shape, seed=2)
bf = lambda a: jnp.asarray(a, jnp.bfloat16)
got = jp.step({k: bf(v) for k, v in params.items()}, bf(x), bf(dy), strategy="dp", world_size=2)
print(json.dumps({"measured": got.bytes_per_device, "model": P.step_cost("dp", shape, 2).bytes_per_device,
                  "dtype": str(got.output.dtype)}))
"""
    out = run_python(code, env=_env(2), timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["measured"] == 2 * r["model"]
    assert r["dtype"] == "float32"  # bfloat16 results come back widened, as the contract says


@pytest.mark.timeout(120)
def test_the_jax_plugin_prepares_host_devices_through_the_hook(run_python):
    code = """
import os, sys
os.environ.pop("XLA_FLAGS", None)
from tensorglot import parallel as P
P.request_host_devices("numpy", 3)
print("numpy", os.environ.get("XLA_FLAGS"))
P.request_host_devices("jax", 3)
import jax
print("jax", len(jax.devices()))
P.request_host_devices("jax", 5)  # too late: JAX has started, the flag stays
print("again", os.environ["XLA_FLAGS"])
"""
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = run_python(code, env=env, timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:3] == [
        "numpy None",
        "jax 3",
        "again --xla_force_host_platform_device_count=3",
    ]
