"""The parallel namespace: one training step of an L-layer MLP split over n devices, and its cost model.

The model is ``relu(x @ w_in) @ w_out`` per layer (no residual), layer l with ``w_in`` (D, F) and
``w_out`` (F, D), parameters named ``layers.{l}.w_in`` and ``layers.{l}.w_out`` (as in `init_mlp`).
A step is forward, backward from a given output gradient ``dy`` (so the loss is ``sum(y * dy)``: no
batch mean, and the gradient of a batch split over ranks is the plain sum of the ranks' gradients),
and an SGD update ``w ← w − lr·g``.

Strategies (``STRATEGIES``):
  * ``dp``: the batch split n ways, every gradient all-reduced (in backward order).
  * ``tp`` (Megatron, arXiv:1909.08053): ``w_in`` split by columns, ``w_out`` by rows; per layer one
    all-reduce of the (B, D) output forward and one of the (B, D) input gradient backward.
  * ``fsdp`` (ZeRO-3, arXiv:1910.02054): the batch split n ways and each parameter split on its first
    axis; a parameter is all-gathered just before its forward use and freed, gathered again before its
    backward use, and its gradient reduce-scattered, so each rank keeps and updates 1/n of everything.
  * ``pp`` (GPipe arXiv:1811.06965, 1F1B arXiv:2104.04473): L layers in p = n stages, the batch in m
    microbatches, run by the time table of `pipeline_schedule`; stage i sends each microbatch's
    (B/m, D) activation to i+1 and its gradient back to i−1.
  * ``dp_tp``: a (d, t) mesh, rank = dp_index·t + tp_index; tp inside each row of t ranks on B/d
    samples, then dp across the d rows all-reduces each rank's 1/t gradient shards.

By concern:
  * `step`: strategies, `MLPShape`, `check_step`, `StepResult` and the `Parallel` protocol;
  * `cost`: the ring cost model, `step_cost`; `schedules`: `pipeline_schedule` and its measures;
  * `mlp`: the step written once over the array API, per rank over `collectives.Collectives`, which
    NumPy's simulated mesh and torch's process group implement (JAX compiles its own `shard_map` bodies
    from the same layer functions);
  * `devices`: `request_host_devices`, a plugin hook.

The transformer (`transformer`, `transformer_rank`, `transformer_pipeline`, `transformer_blocks`,
`transformer_ring`, `transformer_fsdp_tp`, `transformer_shards`, `transformer_schedules`,
`transformer_cost`): one training step of the spec's model under dp, zero1, zero2, fsdp, tp, tp_sp, cp,
pp (gpipe, 1f1b, interleaved, zb_h1)
and the meshes dp_tp, dp_pp, tp_pp, dp_tp_pp, fsdp_tp, written once per rank over the same
`Collectives` (``be.parallel.transformer_step``), with its own cost model (`transformer_cost`).

Every backend returns host NumPy arrays in a `StepResult` (bfloat16 widened to float32): gathering
the shards into full arrays happens outside the step and is not counted.
"""

from __future__ import annotations

from .collectives import Collectives as Collectives
from .cost import COLLECTIVE_BYTES as COLLECTIVE_BYTES
from .cost import Collective as Collective
from .cost import StepCost as StepCost
from .cost import ring_all_gather_bytes as ring_all_gather_bytes
from .cost import ring_all_reduce_bytes as ring_all_reduce_bytes
from .cost import ring_reduce_scatter_bytes as ring_reduce_scatter_bytes
from .cost import send_bytes as send_bytes
from .cost import step_cost as step_cost
from .devices import request_host_devices as request_host_devices
from .mlp import RankPieces as RankPieces
from .mlp import gather_result as gather_result
from .mlp import in_backward as in_backward
from .mlp import init_mlp as init_mlp
from .mlp import layer_backward as layer_backward
from .mlp import layer_forward as layer_forward
from .mlp import mlp_shape as mlp_shape
from .mlp import one_device_step as one_device_step
from .mlp import out_backward as out_backward
from .mlp import param_names as param_names
from .mlp import rank_step as rank_step
from .mlp import sgd as sgd
from .schedules import SCHEDULES as SCHEDULES
from .schedules import ZERO_BUBBLE as ZERO_BUBBLE
from .schedules import activations_held as activations_held
from .schedules import pipeline_bubble as pipeline_bubble
from .schedules import pipeline_schedule as pipeline_schedule
from .schedules import schedule_slots as schedule_slots
from .step import ITEMSIZE as ITEMSIZE
from .step import NAMES as NAMES
from .step import STRATEGIES as STRATEGIES
from .step import STRATEGY_CAPABILITIES as STRATEGY_CAPABILITIES
from .step import MLPShape as MLPShape
from .step import Parallel as Parallel
from .step import StepConfig as StepConfig
from .step import StepResult as StepResult
from .step import check_step as check_step
from .step import default_tp_size as default_tp_size
from .step import max_abs_difference as max_abs_difference
from .step import median_seconds as median_seconds
from .step import parallel_functions as parallel_functions
from .step import single_result as single_result
from .step import step_config as step_config
from .step import step_result as step_result
from .transformer import PIPELINE_SCHEDULES as PIPELINE_SCHEDULES
from .transformer import TRANSFORMER_STRATEGIES as TRANSFORMER_STRATEGIES
from .transformer import Task as Task
from .transformer import TransformerPieces as TransformerPieces
from .transformer import TransformerStep as TransformerStep
from .transformer import TransformerStepResult as TransformerStepResult
from .transformer import gather_transformer as gather_transformer
from .transformer import transformer_step_function as transformer_step_function
from .transformer_checks import check_transformer_step as check_transformer_step
from .transformer_cost import TransformerCost as TransformerCost
from .transformer_cost import transformer_cost as transformer_cost
from .transformer_optim import OPTIMIZERS as OPTIMIZERS
from .transformer_optim import Optimizer as Optimizer
from .transformer_rank import transformer_rank as transformer_rank
from .transformer_schedules import interleaved_schedule as interleaved_schedule
