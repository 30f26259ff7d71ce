"""Learner -> rollout weight broadcast.

- `buckets`: the bucket plan (pure data) and flatten/unflatten.
- `buffers`: `FlatBuffers`, bucket buffers kept from push to push on CPU (where a fresh large
  buffer is page-faulted in every time).
- `group`: `SyncGroup`, a process group of learner rank 0 + the rollout workers that lives beside
  each member's own torch.distributed world (gloo on CPU, NCCL on GPU).
- `inflight`: the window of started-but-unfinished broadcasts that bounds the sender's memory
  and every wait (NCCL collectives return before the data moves).
- `weights`: `push_weights` (every learner rank; ZeRO-3 gathers bucket by bucket),
  `receive_weights` (each rollout worker, an iterator for the engine's loader), checksums.

Importing this package loads torch only (DeepSpeed is imported when a ZeRO-3 push runs); no Ray.
"""

from gmai_rl.sync.buckets import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    TensorSpec,
    flatten,
    plan_buckets,
    plan_fingerprint,
    unflatten,
)
from gmai_rl.sync.buffers import FlatBuffers
from gmai_rl.sync.group import (
    SyncGroup,
    SyncGroupError,
    find_free_port,
    init_sync_group,
)
from gmai_rl.sync.weights import (
    PlanMismatchError,
    checksums,
    param_specs,
    push_weights,
    receive_weights,
    send_weights,
    tensor_checksum,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "Bucket",
    "FlatBuffers",
    "PlanMismatchError",
    "SyncGroup",
    "SyncGroupError",
    "TensorSpec",
    "checksums",
    "find_free_port",
    "flatten",
    "init_sync_group",
    "param_specs",
    "plan_buckets",
    "plan_fingerprint",
    "push_weights",
    "receive_weights",
    "send_weights",
    "tensor_checksum",
    "unflatten",
]
