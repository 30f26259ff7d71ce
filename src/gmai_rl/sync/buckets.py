"""Bucket plan for the weight broadcast: which tensors travel together in one flat buffer.

Sending one collective per parameter costs a round trip per tensor (hundreds for a 7B model);
sending the whole model as one tensor needs a second full copy of it on both sides. A bucket is
the middle ground: tensors of one dtype packed back to back into a flat 1-D buffer of at most
`max_bucket_bytes`, so memory on each side is bounded by one bucket and the number of
collectives by model size / bucket size.

The plan is plain data (names, shapes, dtype names as strings): it pickles without torch
objects, so the driver can build it once from the learner's specs and hand the same plan to every
rollout worker. Sender and receivers must use the SAME plan; `plan_fingerprint` lets the
transport check that.

No torch.distributed here; `flatten`/`unflatten` are the only functions that touch tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

# Bytes per element of the dtypes a plan may carry. Names are `str(torch.dtype)` without "torch.".
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

DEFAULT_BUCKET_BYTES = 256 * 1024**2


def dtype_name(dtype: torch.dtype | str) -> str:
    """The plan's name for a dtype: torch.bfloat16 -> "bfloat16"; a known name passes through."""
    # str(): a plain string also for the config's dtype choices (str subclasses).
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a plan dtype name: "bfloat16" -> torch.bfloat16."""
    dtype = getattr(torch, dtype_name(name))
    assert isinstance(dtype, torch.dtype)
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as it travels: its name, its full (unpartitioned) shape and its wire dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if any(d < 0 for d in self.shape):
            raise ValueError(f"{self.name}: negative dimension in shape {self.shape}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Bucket:
    """Tensors of one dtype laid out back to back in a flat `[numel]` buffer, in `specs` order."""

    dtype: str
    specs: tuple[TensorSpec, ...]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def offsets(self) -> list[int]:
        """Start element of each spec in the flat buffer (len(specs) entries)."""
        starts, at = [], 0
        for spec in self.specs:
            starts.append(at)
            at += spec.numel
        return starts


def plan_buckets(specs: Iterable[TensorSpec], max_bucket_bytes: int) -> list[Bucket]:
    """Pack tensors into single-dtype buckets of at most `max_bucket_bytes`.

    Greedy and deterministic: for each dtype, tensors are taken in the given order and appended to
    that dtype's open bucket until the next one would push it over the limit, which closes it. A
    tensor larger than the limit on its own gets a bucket of its own (it cannot be split: the
    receiver's loader wants whole tensors). The buckets are returned in the order of their first
    tensor, so for a single-dtype model (the usual case: every weight cast to the wire dtype) the
    flat order equals the given order.

    One open bucket per dtype, rather than closing a bucket whenever the dtype changes, keeps a
    model that interleaves dtypes (bf16 weights with fp32 norms, say) from degenerating into one
    tiny bucket per tensor.

    Raises:
        ValueError: on max_bucket_bytes <= 0 or a name seen twice (loaders key tensors by name).
    """
    if max_bucket_bytes <= 0:
        raise ValueError(f"max_bucket_bytes must be positive, got {max_bucket_bytes}")
    # Buckets are created when their first tensor arrives, so this list is already in the order
    # of first tensors; each dtype's open bucket is the last one created for it.
    buckets: list[tuple[str, list[TensorSpec]]] = []
    open_slot: dict[str, int] = {}  # dtype -> index in `buckets` of its open bucket
    open_bytes: dict[str, int] = {}  # dtype -> bytes in that bucket
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor name {spec.name!r} appears twice in the specs")
        seen.add(spec.name)
        used = open_bytes.get(spec.dtype, 0)
        # `used > 0`: an oversize tensor joins an open bucket holding only empty tensors rather
        # than leave that bucket as a zero-byte broadcast.
        if spec.dtype not in open_slot or (used > 0 and used + spec.nbytes > max_bucket_bytes):
            open_slot[spec.dtype] = len(buckets)
            buckets.append((spec.dtype, []))
            used = 0
        buckets[open_slot[spec.dtype]][1].append(spec)
        open_bytes[spec.dtype] = used + spec.nbytes
    return [Bucket(dtype, tuple(group)) for dtype, group in buckets]


def plan_fingerprint(plan: Sequence[Bucket]) -> bytes:
    """sha256 (32 bytes) of the plan's layout: equal iff names, shapes, dtypes and order agree."""
    digest = hashlib.sha256()
    for bucket in plan:
        digest.update(f"[{bucket.dtype}]".encode())
        for spec in bucket.specs:
            digest.update(f"{spec.name}:{spec.shape}:{spec.dtype};".encode())
    return digest.digest()


def flatten(
    bucket: Bucket,
    tensors: Sequence[torch.Tensor],
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy a bucket's tensors into one flat buffer, cast to the bucket's dtype.

    Args:
        bucket: the layout.
        tensors: one tensor per spec, in `bucket.specs` order, each with `spec.numel` elements
            (any shape with that many elements, any dtype: `copy_` casts, e.g. fp32 -> bf16).
        device: where a new buffer lives; default: the first tensor's device.
        out: a `[bucket.numel]` buffer of `bucket.dtype` to fill instead of a new one (see
            `gmai_rl.sync.buffers`).

    Returns:
        `[bucket.numel]` tensor of `bucket.dtype` (`out` when given; no aliasing of `tensors`).
    """
    if len(tensors) != len(bucket.specs):
        raise ValueError(f"bucket has {len(bucket.specs)} tensors, got {len(tensors)}")
    if out is not None:
        if out.shape != (bucket.numel,) or out.dtype != torch_dtype(bucket.dtype):
            raise ValueError(
                f"out must be a [{bucket.numel}] {bucket.dtype} buffer, got "
                f"{tuple(out.shape)} {out.dtype}"
            )
        flat = out
    else:
        if device is None:
            device = tensors[0].device if tensors else "cpu"
        flat = torch.empty(bucket.numel, dtype=torch_dtype(bucket.dtype), device=device)
    for spec, start, tensor in zip(bucket.specs, bucket.offsets(), tensors, strict=True):
        if tensor.numel() != spec.numel:
            raise ValueError(
                f"{spec.name}: expected {spec.numel} elements (shape {spec.shape}), got "
                f"{tensor.numel()} (shape {tuple(tensor.shape)}); under ZeRO-3 gather it first"
            )
        flat[start : start + spec.numel].copy_(tensor.detach().reshape(-1))
    return flat


def unflatten(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Split a flat buffer back into named tensors of their spec shapes.

    Args:
        bucket: the layout the buffer was built with.
        flat: `[bucket.numel]` tensor of `bucket.dtype`.

    Returns:
        (name, tensor) in `bucket.specs` order. The tensors are VIEWS into `flat`: no copy, and
        each keeps the whole buffer alive while referenced. That is safe as long as nobody writes
        into `flat` afterwards (`receive_weights` reuses a buffer only for a loader that has
        copied the previous bucket's tensors); a loader that stores a tensor instead of copying
        it should `.clone()` it, or it pins the bucket's whole memory for one tensor.
    """
    if flat.dim() != 1 or flat.numel() != bucket.numel:
        raise ValueError(f"expected a flat [{bucket.numel}] buffer, got {tuple(flat.shape)}")
    if flat.dtype != torch_dtype(bucket.dtype):
        raise ValueError(f"expected dtype {bucket.dtype}, got {flat.dtype}")
    return [
        (spec.name, flat[start : start + spec.numel].view(spec.shape))
        for spec, start in zip(bucket.specs, bucket.offsets(), strict=True)
    ]
