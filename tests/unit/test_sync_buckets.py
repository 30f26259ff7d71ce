"""Bucket plan, flatten/unflatten and checksums: pure functions, no process group.

A wrong plan is silent corruption on the rollout side (a tensor loaded with another tensor's
bytes still has a valid shape), so the layout rules are pinned down here one by one.
"""

import itertools
import pickle
import random

import pytest
import torch

from gmai_rl.sync.buckets import (
    Bucket,
    TensorSpec,
    flatten,
    plan_buckets,
    plan_fingerprint,
    torch_dtype,
    unflatten,
)
from gmai_rl.sync.weights import checksums, param_specs, tensor_checksum


def spec(name: str, numel: int, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, (numel,), dtype)


def all_names(plan: list[Bucket]) -> list[str]:
    return [name for bucket in plan for name in bucket.names]


def test_single_dtype_keeps_the_given_order_and_fills_greedily() -> None:
    specs = [spec(f"p{i}", 10) for i in range(7)]  # 40 bytes each
    plan = plan_buckets(specs, max_bucket_bytes=100)
    assert [b.names for b in plan] == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"], ["p6"]]
    assert all_names(plan) == [s.name for s in specs]


def test_exact_fit_shares_a_bucket() -> None:
    plan = plan_buckets([spec("a", 15), spec("b", 10)], max_bucket_bytes=100)
    assert [b.names for b in plan] == [["a", "b"]]
    assert plan[0].nbytes == 100


def test_dtypes_never_share_a_bucket_and_keep_their_own_order() -> None:
    specs = [
        spec("w0", 4, "bfloat16"),
        spec("norm0", 4, "float32"),
        spec("w1", 4, "bfloat16"),
        spec("norm1", 4, "float32"),
        spec("w2", 4, "bfloat16"),
    ]
    plan = plan_buckets(specs, max_bucket_bytes=1024)
    # Interleaved dtypes do not split into one bucket per tensor: one open bucket per dtype.
    assert [(b.dtype, b.names) for b in plan] == [
        ("bfloat16", ["w0", "w1", "w2"]),
        ("float32", ["norm0", "norm1"]),
    ]


def test_buckets_come_in_the_order_of_their_first_tensor() -> None:
    specs = [spec("a", 20, "float16"), spec("b", 5), spec("c", 20, "float16"), spec("d", 5)]
    plan = plan_buckets(specs, max_bucket_bytes=40)  # each fp16 tensor fills a bucket
    assert [b.names for b in plan] == [["a"], ["b", "d"], ["c"]]


def test_oversize_tensor_gets_a_bucket_of_its_own() -> None:
    specs = [spec("small0", 5), spec("huge", 1000), spec("small1", 5), spec("small2", 5)]
    plan = plan_buckets(specs, max_bucket_bytes=64)
    assert [b.names for b in plan] == [["small0"], ["huge"], ["small1", "small2"]]
    assert plan[1].nbytes == 4000


def test_size_bound_and_completeness_on_random_specs() -> None:
    rng = random.Random(0)
    dtypes = ["float32", "bfloat16", "float16"]
    specs = [
        spec(f"t{i}", rng.choice([0, 1, 7, 64, 300, 5000]), rng.choice(dtypes)) for i in range(300)
    ]
    limit = 4096
    plan = plan_buckets(specs, max_bucket_bytes=limit)
    assert sorted(all_names(plan)) == sorted(s.name for s in specs)
    for bucket in plan:
        assert len({s.dtype for s in bucket.specs}) == 1 and bucket.specs[0].dtype == bucket.dtype
        assert bucket.nbytes <= limit or len([s for s in bucket.specs if s.nbytes]) == 1
    for dtype in dtypes:  # within a dtype: original order, and no bucket closed too early
        mine = [b for b in plan if b.dtype == dtype]
        assert all_names(mine) == [s.name for s in specs if s.dtype == dtype]
        for before, after in itertools.pairwise(mine):
            assert before.nbytes + after.specs[0].nbytes > limit


def test_plan_is_deterministic() -> None:
    specs = [spec(f"t{i}", (i * 37) % 101, ["float32", "bfloat16"][i % 2]) for i in range(50)]
    assert plan_buckets(specs, 256) == plan_buckets(list(specs), 256)


def test_empty_input_gives_an_empty_plan() -> None:
    assert plan_buckets([], max_bucket_bytes=100) == []


@pytest.mark.parametrize(
    ("specs", "limit", "match"),
    [
        ([spec("a", 1), spec("a", 2)], 100, "twice"),
        ([spec("a", 1)], 0, "positive"),
    ],
)
def test_invalid_plans_are_refused(specs: list[TensorSpec], limit: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_buckets(specs, limit)


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec("x", (2,), "complex64")


def test_plan_pickles_as_plain_data() -> None:
    plan = plan_buckets([spec("a", 3, "bfloat16"), TensorSpec("b", (2, 3), "float32")], 1024)
    blob = pickle.dumps(plan)
    assert b"torch" not in blob  # no torch.dtype or tensor inside: dtypes travel as strings
    assert pickle.loads(blob) == plan


def test_fingerprint_tells_plans_apart() -> None:
    base = [TensorSpec("a", (2, 3), "float32"), TensorSpec("b", (4,), "float32")]
    fp = plan_fingerprint(plan_buckets(base, 1024))
    assert fp == plan_fingerprint(plan_buckets(list(base), 1024))
    variants = [
        [TensorSpec("a", (3, 2), "float32"), base[1]],  # same numel, other shape
        [TensorSpec("a", (2, 3), "bfloat16"), base[1]],
        [TensorSpec("z", (2, 3), "float32"), base[1]],
        [base[1], base[0]],
    ]
    for other in variants:
        assert plan_fingerprint(plan_buckets(other, 1024)) != fp
    assert plan_fingerprint(plan_buckets(base, 24)) != fp  # other bucket boundaries


def make_tensors(specs: list[TensorSpec], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s.shape, generator=gen).to(torch_dtype(s.dtype)) for s in specs]


def test_flatten_unflatten_round_trip_mixed_shapes_and_dtypes() -> None:
    specs = [
        TensorSpec("matrix", (3, 5), "float32"),
        TensorSpec("scalar", (), "float32"),
        TensorSpec("empty", (0, 4), "float32"),
        TensorSpec("vec", (7,), "bfloat16"),
        TensorSpec("cube", (2, 2, 2), "bfloat16"),
    ]
    by_name = dict(zip([s.name for s in specs], make_tensors(specs), strict=True))
    plan = plan_buckets(specs, max_bucket_bytes=1 << 20)
    for bucket in plan:
        flat = flatten(bucket, [by_name[n] for n in bucket.names])
        assert flat.shape == (bucket.numel,) and flat.dtype == torch_dtype(bucket.dtype)
        out = unflatten(bucket, flat)
        assert [n for n, _ in out] == bucket.names
        for name, tensor in out:
            assert tensor.dtype == by_name[name].dtype
            assert torch.equal(tensor, by_name[name])


def test_flatten_casts_to_the_wire_dtype() -> None:
    master = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))  # fp32 master weights
    bucket = Bucket("bfloat16", (TensorSpec("w", (4, 6), "bfloat16"),))
    ((_, wire),) = unflatten(bucket, flatten(bucket, [master]))
    assert wire.dtype == torch.bfloat16
    assert torch.equal(wire, master.to(torch.bfloat16))


def test_flatten_copies_and_unflatten_views() -> None:
    source = torch.zeros(4)
    bucket = Bucket("float32", (TensorSpec("a", (2,), "float32"), TensorSpec("b", (2,), "float32")))
    flat = flatten(bucket, [source[:2], source[2:]])
    source.fill_(1.0)
    assert flat.sum() == 0  # the sender may release its tensors once flattened
    views = unflatten(bucket, flat)
    flat.fill_(2.0)
    assert all(bool((t == 2.0).all()) for _, t in views)  # documented: views share the buffer


def test_flatten_rejects_a_partitioned_tensor() -> None:
    bucket = Bucket("float32", (TensorSpec("w", (4, 4), "float32"),))
    with pytest.raises(ValueError, match="gather it first"):
        flatten(bucket, [torch.empty(0)])  # what a ZeRO-3 param looks like outside a gather


def test_unflatten_rejects_a_wrong_buffer() -> None:
    bucket = Bucket("float32", (TensorSpec("w", (4,), "float32"),))
    with pytest.raises(ValueError, match="flat"):
        unflatten(bucket, torch.zeros(5))
    with pytest.raises(ValueError, match="dtype"):
        unflatten(bucket, torch.zeros(4, dtype=torch.bfloat16))


def test_param_specs_wire_dtype_and_zero3_shape() -> None:
    model = torch.nn.Linear(3, 2)
    assert param_specs(model.named_parameters()) == [
        TensorSpec("weight", (2, 3), "float32"),
        TensorSpec("bias", (2,), "float32"),
    ]
    assert {s.dtype for s in param_specs(model.named_parameters(), torch.bfloat16)} == {"bfloat16"}
    # Under ZeRO-3 a parameter is an empty placeholder; its real shape is `ds_shape`.
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_shape = torch.Size([8, 16])  # type: ignore[attr-defined]
    assert param_specs([("w", partitioned)]) == [TensorSpec("w", (8, 16), "float32")]


def test_checksum_is_exact_and_handles_bf16() -> None:
    t = torch.randn(16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert tensor_checksum(t) == tensor_checksum(t.clone())
    flipped = t.clone()
    flipped.view(torch.int16)[3] ^= 1  # one bit of one element
    assert tensor_checksum(flipped) != tensor_checksum(t)
    same_bytes = t.view(torch.float16)
    assert tensor_checksum(same_bytes) != tensor_checksum(t)  # dtype is part of the checksum
    assert tensor_checksum(t.view(4, 4)) != tensor_checksum(t)  # and so is the shape
    assert tensor_checksum(torch.tensor(0.0)) != tensor_checksum(torch.tensor(-0.0))


def test_checksum_ignores_memory_layout() -> None:
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert tensor_checksum(t.t()) == tensor_checksum(t.t().contiguous())
    assert checksums([("a", t), ("b", t.t())]).keys() == {"a", "b"}
