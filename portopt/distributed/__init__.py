"""portopt under ``torch.distributed``: sharded parameters (FSDP2, tensor parallel) stepped exactly.

:mod:`~portopt.distributed.layout` says how a DTensor parameter lies on its mesh and hands a backend its
local pieces; :mod:`~portopt.distributed.reductions` completes per-tensor and row/column reductions over
the mesh, batched. ZeRO-1 (``ZeroRedundancyOptimizer``) and DDP step whole tensors and need nothing here.
"""

from portopt.distributed.layout import (
    ShardingError,
    ShardLayout,
    as_distributed,
    check_blocks_whole,
    check_checkpointable,
    check_sharded_mode,
    is_distributed,
    layout_of,
    local_views,
    logical_facts,
    logical_shape,
    reads_whole_tensor,
)

__all__ = [
    "ShardLayout",
    "ShardingError",
    "as_distributed",
    "check_blocks_whole",
    "check_checkpointable",
    "check_sharded_mode",
    "is_distributed",
    "layout_of",
    "local_views",
    "logical_facts",
    "logical_shape",
    "reads_whole_tensor",
]
