"""The spec's reader of a compiled XLA module's collectives, on text in XLA's own spellings (no JAX needed)."""

from __future__ import annotations

from tensorglot.parallel import Collective
from tensorglot.parallel.hlo import hlo_collectives, replica_groups

HLO = """
  %psum.1 = f32[8,4]{1,0} all-reduce(%dot.1), channel_id=1, replica_groups={{0,1},{2,3}}, use_global_device_ids=true
  %all-reduce = (f32[4,4]{1,0}, bf16[4,4]{1,0}) all-reduce(%a, %b), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0)
  %ag = f32[8,4]{1,0} all-gather(%s), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
  %rs = f32[2,4]{1,0} reduce-scatter(%g), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %pp = f32[2,4]{1,0} collective-permute(%h), channel_id=5, source_target_pairs={{0,1},{1,2}}
"""


def test_hlo_collectives_read_kind_bytes_groups_and_pairs():
    per_device = hlo_collectives(HLO, 4)
    assert per_device[0] == [
        Collective("all_reduce", "%psum.1", 128, 2),  # 8·4·4 bytes, rows {0,1}
        Collective("all_reduce", "%all-reduce", 96, 2),  # a tuple: 64 + 32 bytes; iota groups {0,2},{1,3}
        Collective("all_gather", "%ag", 128, 4),
        Collective("reduce_scatter", "%rs", 128, 4),  # the operand: 4 × the (2, 4) result
        Collective("send", "%pp", 32, 2),
    ]
    # devices 0 and 1 are the sources of the pairs; 2 and 3 only receive
    assert [c.kind for c in per_device[1]][-1] == "send"
    for d in (2, 3):
        assert [c.kind for c in per_device[d]] == ["all_reduce", "all_reduce", "all_gather", "reduce_scatter"]
    assert replica_groups("replica_groups=[2,2]<=[2,2]T(1,0), x", 4) == [[0, 2], [1, 3]]
    assert sum(c.bytes_per_device for c in per_device[0]) == 128 + 96 + 96 + 96 + 32
