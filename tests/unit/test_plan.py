"""The pre-flight plan: its learner arithmetic against DeepSpeed's own estimators, a Qwen2.5-VL-7B
built from its config on the meta device, MM-EUREKA's published layout and our 7B preset fitting
an 8 x 80 GiB node, configs that cannot fit refused with their numbers, and `gmai-rl plan`."""

from __future__ import annotations

import dataclasses
import math

import pytest

from gmai_rl.cli import main
from gmai_rl.plan import Hardware, ParamCounts, check, make_plan, read_model, render
from gmai_rl.plan.memory import Memory, learner_states, reference_states, total
from gmai_rl.plan.nodes import nodes_needed
from gmai_rl.plan.prompt import image_tokens, prompt_tokens
from gmai_rl.rollout.sizing import GIB, bytes_text, kv_bytes_per_token
from support import train_config

H100 = 79.18 * GIB
"""An "80 GB" H100's memory as torch.cuda and vLLM report it (cluster.gpu_memory_gib's default)."""

NODE = Hardware(
    gpus_per_node=8,
    gpu_memory=H100,
    source="an 8 x 80 GB node",
    single_node=True,
    host_memory=1024 * GIB,
)
"""The node both recipes were published for (8 x A100/H100 80GB, 1 TiB of host memory)."""

PRESET = ("+experiment=gmai_vl_r1_7b", "data.root=/data/GMAI-Reasoning10K")

MM_EUREKA = (
    # examples/scripts/train_mm_eureka_qwen_7b_single_node.sh on MM-EUREKA's OpenRLHF fork: all
    # 8 GPUs shared by 8 actor ranks and 8 vLLM engines (--colocate_all_models,
    # --vllm_enable_sleep, --vllm_gpu_memory_utilization 0.3), --zero_stage 1 --adam_offload,
    # --prompt_max_len 3000 --generate_max_len 4096 (the engine's window is their sum).
    "cluster.colocate=true",
    "cluster.learner_ranks=8",
    "cluster.rollout_workers=8",
    "learner.zero_stage=1",
    "learner.offload_optimizer=true",
    "rollout.vllm.enable_sleep_mode=true",
    "rollout.vllm.gpu_memory_utilization=0.3",
    "rollout.max_new_tokens=4096",
    "rollout.vllm.max_model_len=7096",
)


def write_qwen2_5_vl_7b_config(folder) -> str:
    """Qwen2.5-VL-7B-Instruct's config.json with its published dimensions (no weights)."""
    from transformers import Qwen2_5_VLConfig

    Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        tie_word_embeddings=False,
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory):
    """(model.path override, the facts the plan reads) of the 7B config under the preset's model
    options (frozen vision tower, max_pixels 1003520)."""
    path = write_qwen2_5_vl_7b_config(tmp_path_factory.mktemp("qwen2_5_vl_7b"))
    override = f"model.path={path}"
    return override, read_model(train_config(*PRESET, override).model)


def plan_of(qwen7b, *overrides, hw=NODE):
    override, facts = qwen7b
    return make_plan(train_config(*PRESET, override, *overrides), facts, hw)


# ---------------------------------------------------------- the learner against DeepSpeed

P, L = 8_292_166_656, 544_997_376  # a 7B-sized model and its largest layer (the embedding)
ALL_TRAINABLE = ParamCounts(total=P, trainable=P, vision=0, largest_layer=L)


def states(ranks, stage, offload, bf16=True, params=ALL_TRAINABLE, weight_bytes=4) -> Memory:
    return total(learner_states(params, ranks, stage, bf16, weight_bytes, offload).values())


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_zero2_on_the_gpu_is_deepspeeds_estimate_less_its_16bit_gradient_partition(ranks):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=ranks, cpu_offload=False)
    ours = states(ranks, 2, offload=False)
    # DeepSpeed's 2 + 18/N assumes the fp16 path, which keeps the reduced gradients in 16 bits
    # and upcasts them at the step (2 + 4 bytes). Our config accumulates in fp32
    # (data_types.grad_accum_dtype), and ZeRO-2 then reduces straight into an fp32 partition
    # (stage_1_and_2.py, _use_compact_grad_partition_buffer): 4 bytes, no 16-bit partition.
    assert ours.device + 2 * P / ranks == pytest.approx(gpu, abs=8)
    assert ours.host == 0


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_zero2_with_offload_is_deepspeeds_estimate(ranks):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=ranks, cpu_offload=True)
    ours = states(ranks, 2, offload=True)
    assert ours.device == pytest.approx(gpu, abs=8)  # the 16-bit weights only
    # DeepSpeed's CPU figure is per node with a 1.5 buffer factor, and at least 4 bytes per
    # parameter per GPU for each process's initial fp32 load (the max(4 x GPUs, 16) term, which
    # is 16 up to 4 GPUs); our ranks load 16-bit weights straight onto their GPU.
    assert ours.host * ranks * 1.5 == pytest.approx(cpu, abs=8)


@pytest.mark.parametrize("ranks", [1, 4, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_zero3_is_deepspeeds_estimate(ranks, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        P, L, num_gpus_per_node=ranks, cpu_offload=offload, cpu_offload_params=False
    )
    ours = states(ranks, 3, offload=offload)
    assert ours.device == pytest.approx(gpu, abs=8)  # 4 x largest layer + 18/N, or 2/N offloaded
    assert largest == 4 * L
    if offload:  # 16 bytes per parameter over the node's ranks, with DeepSpeed's 1.5 factor
        assert ours.host * ranks * 1.5 == pytest.approx(cpu, abs=8)
    else:
        assert ours.host == 0


def test_frozen_parameters_hold_only_their_weights():
    frozen = 676_550_144
    params = ParamCounts(total=P, trainable=P - frozen, vision=frozen, largest_layer=L)
    for stage in (1, 2, 3):
        drop = states(4, stage, False).device - states(4, stage, False, params=params).device
        per_trainable = {1: 4 + 12 / 4 + 2, 2: 16 / 4, 3: 16 / 4}[stage]
        assert drop == pytest.approx(frozen * per_trainable)


def test_fp32_without_zero_is_4_4_8_bytes_per_parameter():
    assert states(1, 0, False, bf16=False).device == 16 * P
    # ZeRO-1 shards Adam's moments and adds an fp32 master partition (a copy, even of fp32).
    assert states(4, 1, False, bf16=False).device == pytest.approx(4 * P + 4 * P + 12 * P / 4)


def test_zero1_keeps_fp32_gradients_whole_and_offloads_the_optimizer():
    rows = learner_states(ALL_TRAINABLE, 8, 1, True, 4, True)
    assert rows["fp32 gradients"] == Memory(device=4 * P, host=4 * P / 8)
    assert rows["Adam moments (fp32)"] == Memory(host=8 * P / 8)
    assert "bf16 gradients" not in rows  # folded into fp32 by DeepSpeed's hooks as they come
    assert "bf16 gradients" in learner_states(ALL_TRAINABLE, 8, 1, True, 4, False)


def test_the_reference_is_a_replica_a_partition_or_in_host_memory():
    assert reference_states(P, 4, 2, 2, offload=False) == Memory(device=2 * P)
    assert reference_states(P, 4, 3, 2, offload=False) == Memory(device=2 * P / 4)
    assert reference_states(P, 4, 2, 2, offload=True) == Memory(host=2 * P / 4)


# ------------------------------------------------------------------------- small formulas


def test_kv_cache_and_image_token_formulas():
    assert kv_bytes_per_token(28, 4, 128, 2) == 2 * 28 * 4 * 128 * 2
    assert kv_bytes_per_token(28, 4, 128, 2, tensor_parallel=2) == 2 * 28 * 2 * 128 * 2
    assert kv_bytes_per_token(28, 4, 128, 2, tensor_parallel=8) == 2 * 28 * 1 * 128 * 2
    assert image_tokens(1280 * 28 * 28, 14, 2) == 1280
    assert image_tokens(56 * 56, 14, 2) == 4  # the demo's images
    assert prompt_tokens(2, 4, "abcdef", question=10) == 2 * (4 + 2) + 2 + 16 + 10


def test_bundles_pack_onto_nodes_first_fit():
    assert nodes_needed([1] * 8, 8) == 1
    assert nodes_needed([1] * 9, 8) == 2
    assert nodes_needed([4, 4, 4, 2, 2], 8) == 2
    assert nodes_needed([0, 0], 8) == 0


# --------------------------------------------------------------------- a 7B from its config


def test_a_qwen2_5_vl_7b_config_counts_its_published_sizes(qwen7b):
    _, facts = qwen7b
    p = facts.params
    assert round(p.total / 1e9, 2) == 8.29  # Qwen2.5-VL-7B-Instruct: 8.29B
    assert 0.67e9 < p.vision < 0.68e9
    assert p.trainable == p.total - p.vision  # model.freeze_vision in the preset
    assert p.largest_layer == 152064 * 3584  # the embedding (the LM head is as large, untied)
    assert (facts.layers, facts.kv_heads, facts.head_dim) == (28, 4, 128)
    assert facts.max_pixels == 1003520 and facts.max_positions == 128000


def test_our_7b_preset_fits_an_8_x_80_gb_node(qwen7b):
    plan = plan_of(qwen7b)
    assert check(plan) == []
    p = plan.model.params
    # ZeRO-3 over 4 ranks, bf16: 16-bit weights and fp32 states partitioned, a layer gathered.
    expected = (2 * p.total + 16 * p.trainable) / 4 + 4 * p.largest_layer
    assert plan.learner_total.device == pytest.approx(expected)
    assert plan.reference is None  # kl_coef 0
    assert plan.engine.weights == 2 * p.total  # bf16, TP 1
    assert plan.kv_sequences >= 1 and plan.prompt.image_tokens == 1280
    assert plan.prompt.longest <= plan.prompt.window == 8192
    table = render(plan)
    assert "fits: yes" in table and "activations (2 x 6008 tokens, checkpointed)" in table
    # Beyond the states: a checkpointed micro-batch, the chunked head, DeepSpeed's bf16 reduce
    # bucket; rank 0's push holds two 512 MiB buckets and, under ZeRO-3, one bucket gathered.
    working = {name.split(" (")[0]: mem.device for name, mem in plan.working.items()}
    assert 4 * GIB < working["activations"] < 6 * GIB
    assert working["DeepSpeed gradient bucket"] == 2 * 500_000_000
    assert sum(m.device for m in plan.push.values()) == 3 * 512 * 2**20
    assert plan.learner_training < H100
    # An engine's GPU: its 0.85 and, in a push, a bucket outside it.
    assert plan.gpu_peak == pytest.approx(0.85 * H100 + 512 * 2**20) == plan.engine_pushed


def test_mm_eurekas_colocated_layout_fits_an_8_x_80_gb_node(qwen7b):
    plan = plan_of(qwen7b, *MM_EUREKA)
    assert check(plan) == []
    p = plan.model.params
    # ZeRO-1 + offload: 16-bit weights and whole fp32 gradient accumulators stay on the GPU.
    assert plan.learner_total.device == pytest.approx(2 * p.total + 4 * p.trainable)
    assert plan.learner_total.host == pytest.approx(16 * p.trainable / 8)
    # The engines sleep while the learners train; awake, they take their 0.3 in a push.
    assert plan.engine_sleeps
    pushing = plan.learner_pushing + 0.3 * H100 + plan.engine_receive
    assert plan.gpu_peak == pytest.approx(max(plan.learner_training, pushing))
    assert plan.gpu_peak < H100
    assert plan.kv_sequences >= 1
    assert plan.prompt.longest <= 7096


# ------------------------------------------------------------------- what cannot fit


def test_a_7b_in_fp32_without_zero_on_one_gpu_is_refused_with_its_numbers(qwen7b):
    plan = plan_of(
        qwen7b,
        "learner.zero_stage=0",
        "learner.bf16=false",
        "model.dtype=float32",
        "cluster.learner_ranks=1",
        "cluster.rollout_workers=1",
    )
    p = plan.model.params
    need = 4 * p.total + 4 * p.trainable + 8 * p.trainable
    (problem,) = [x for x in check(plan) if "learner rank" in x]
    assert bytes_text(need) in problem and "79.18 GiB" in problem
    assert "learner.zero_stage=3" in problem
    assert "fits: NO" in render(plan)


def test_a_prompt_longer_than_the_engine_window_is_refused_with_its_numbers(qwen7b):
    plan = plan_of(qwen7b, "rollout.vllm.max_model_len=4096")
    (problem,) = check(plan)
    assert f"+ rollout.max_new_tokens 4096 = {plan.prompt.longest} > " in problem
    assert "rollout.vllm.max_model_len 4096" in problem
    assert "1280 tokens at max_pixels 1003520" in problem


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.vllm.gpu_memory_utilization=0.2"], "less than one sequence of 8192"),
        ([*MM_EUREKA, "rollout.vllm.gpu_memory_utilization=0.5"], "colocated: "),
        (["learner.zero_stage=0"], "learner.zero_stage=0 with learner.bf16=true"),
        (["cluster.learner_ranks=8"], "the bundles need 12 GPUs, 2 nodes of 8"),
        (["rollout.vllm.max_model_len=200000"], "exceeds the model's 128000 positions"),
        (["cluster.num_cpus=8"], "cluster.num_cpus=8: the placement group takes 32 CPUs"),
    ],
)
def test_layouts_that_cannot_fit_are_refused(qwen7b, overrides, message):
    problems = check(plan_of(qwen7b, *overrides))
    assert any(message in p for p in problems), problems


def test_host_memory_is_checked_on_a_local_cluster(qwen7b):
    small = Hardware(8, 80 * GIB, "test", True, host_memory=64 * GIB)
    problems = check(plan_of(qwen7b, *MM_EUREKA, hw=small))
    assert any("host memory: the actors need" in p and "64.00 GiB" in p for p in problems)
    remote = Hardware(8, 80 * GIB, "test", False, None, "the Ray cluster is remote")
    plan = plan_of(qwen7b, *MM_EUREKA, hw=remote)
    assert check(plan) == [] and "host memory not checked: the Ray cluster is remote" in render(
        plan
    )


def test_unknown_gpu_memory_skips_the_gpu_checks_and_says_so(qwen7b):
    unknown = Hardware(None, None, "unknown: no GPU on the driver", False, None, "remote")
    plan = plan_of(qwen7b, "learner.zero_stage=0", "learner.bf16=false", hw=unknown)
    assert not any("learner rank" in p for p in check(plan))
    assert "GPU memory not checked: unknown: no GPU on the driver" in render(plan)


def test_null_gpu_fields_read_the_drivers_gpus(monkeypatch):
    from gmai_rl.plan import nodes

    monkeypatch.setattr(nodes, "driver_gpus", lambda: (4, 24.0 * GIB))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nulls = ("cluster.gpus_per_node=null", "cluster.gpu_memory_gib=null")
    hw = nodes.hardware(train_config(*nulls))
    assert (hw.gpus_per_node, hw.gpu_memory) == (4, 24 * GIB) and "torch.cuda" in hw.source
    assert hw.single_node and hw.host_memory  # the CPU demo runs on this machine
    hw = nodes.hardware(train_config("cluster.address=ray://head:10001"))
    assert (hw.gpus_per_node, hw.gpu_memory) == (8, H100)  # the defaults: not read
    assert not hw.single_node and hw.host_memory is None


# --------------------------------------------------------------------- the demo and the CLI


def test_the_demo_plans_the_tiny_model_before_it_exists(tiny_model_dir, tmp_path):
    written = read_model(train_config(f"model.path={tiny_model_dir}").model)
    in_memory = read_model(train_config(f"model.path={tmp_path / 'absent'}").model)
    assert in_memory.params == written.params and in_memory.max_pixels == written.max_pixels
    assert "the tiny model the run builds" in in_memory.source


def test_a_run_measures_its_questions_instead_of_assuming(qwen7b, synthetic_dir):
    from gmai_rl.data import format_question, load_mcq_jsonl

    items = load_mcq_jsonl(synthetic_dir / "train.jsonl")
    override, facts = qwen7b
    cfg = train_config(*PRESET, override)
    measured = make_plan(cfg, facts, NODE, items).prompt
    assumed = make_plan(cfg, facts, NODE).prompt
    assert measured.measured and not assumed.measured
    longest = max(len(format_question(item)) for item in items)
    assert measured.question == math.ceil(longest / 3) < assumed.question
    assert measured.images == assumed.images == 1
    assert assumed.prompt - measured.prompt == assumed.question - measured.question


def test_gmai_rl_plan_prints_the_demo_plan(tiny_model_dir, tmp_path, capsys):
    args = ["plan", f"model.path={tiny_model_dir}", f"data.synthetic.dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "CPU run: no GPU memory to check" in out
    assert (
        "fits: yes" in out and "activations (" in out and "not estimated: the CUDA context" in out
    )
    assert not (tmp_path / "train.jsonl").exists()  # a plan writes nothing


def test_gmai_rl_plan_exits_non_zero_listing_the_problems(tiny_model_dir, tmp_path, capsys):
    args = ["plan", f"model.path={tiny_model_dir}", f"data.synthetic.dir={tmp_path}"]
    assert main([*args, "rollout=vllm", "rollout.vllm.max_model_len=128"]) == 1
    out = capsys.readouterr().out
    assert "the configuration cannot fit:" in out
    assert "> rollout.vllm.max_model_len 128" in out


def test_a_run_stops_before_the_cluster_when_the_plan_cannot_fit(
    tiny_model_dir, synthetic_dir, tmp_path, monkeypatch
):
    from gmai_rl import loop

    def no_cluster(cfg):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(loop, "ray_session", no_cluster)
    cfg = train_config(
        f"model.path={tiny_model_dir}",
        f"data.synthetic.dir={synthetic_dir}",
        f"trainer.output_dir={tmp_path / 'out'}",
        f"data.image_check_cache={tmp_path / 'image-checks.json'}",
        "rollout=vllm",
        "rollout.vllm.max_model_len=128",
    )
    with pytest.raises(ValueError, match=r"(?s)cannot fit.*> rollout.vllm.max_model_len 128"):
        loop.run(cfg)


def test_items_with_more_images_than_the_engine_takes_are_named_before_the_run(
    qwen7b, synthetic_dir
):
    import dataclasses

    from gmai_rl.data import load_mcq_jsonl

    items = load_mcq_jsonl(synthetic_dir / "train.jsonl")[:10]
    two = [dataclasses.replace(item, images=item.images * 2) for item in items[3:10]]
    items = [*items[:3], *two]
    override, facts = qwen7b

    def data_problems(*overrides):
        plan = make_plan(train_config(*PRESET, override, *overrides), facts, NODE, items)
        return [p for p in check(plan) if "more images than" in p]

    (problem,) = data_problems()  # the preset's vLLM engine takes one image per prompt
    assert problem.startswith("7 item(s) have more images than rollout.vllm.images_per_prompt=1")
    assert f"{two[0].source} (2 images)" in problem and "and 2 more" in problem
    assert items[0].source not in problem
    assert data_problems("rollout.vllm.images_per_prompt=2") == []
    assert make_plan(train_config(*PRESET, override), facts, NODE).data_problems == []


def test_text_only_items_beside_images_are_refused_for_a_vision_model_under_zero3(
    qwen7b, synthetic_dir
):
    import dataclasses

    from gmai_rl.data import load_mcq_jsonl

    items = load_mcq_jsonl(synthetic_dir / "train.jsonl")[:6]
    text_only = [dataclasses.replace(item, images=()) for item in items[4:]]
    mixed = [*items[:4], *text_only]
    override, facts = qwen7b

    def refused(trained, *overrides):
        cfg = train_config(*PRESET, override, *overrides)
        plan = make_plan(cfg, facts, NODE, trained, trained=trained)
        return [p for p in check(plan) if "have no image" in p]

    (problem,) = refused(mixed, "learner.zero_stage=3")
    assert "2 trained item(s) have no image" in problem
    assert all(item.source in problem for item in text_only) and "zero_stage=2" in problem
    assert refused(mixed, "learner.zero_stage=2") == []
    assert refused(items, "learner.zero_stage=3") == []  # every micro-batch has images
    assert refused(text_only, "learner.zero_stage=3") == []  # none has: the tower never runs


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC "
            "2023\nGCC version:  gcc version 11.4.0",
            "535.104.05",
        ),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
            "(dvs-builder@U16-I3-B13-4-1)  Sun Jul 27 07:09:38 UTC 2025",
            "580.65.06",
        ),
        ("", None),
    ],
)
def test_the_nvidia_driver_version_is_read_from_its_kernel_module_line(text, version):
    from gmai_rl.plan.nodes import nvidia_driver_version

    assert nvidia_driver_version(text) == version


def test_a_driver_older_than_cuda_13_needs_is_a_problem_naming_the_fix(qwen7b):
    from gmai_rl.plan.nodes import driver_problems

    (problem,) = driver_problems("535.104.05")
    assert "needs driver >= 580" in problem and "upgrade the node's driver" in problem
    assert driver_problems("580.65.06") == driver_problems(None) == []
    override, facts = qwen7b
    old = dataclasses.replace(NODE, driver="570.86.10")
    plan = make_plan(train_config(*PRESET, override), facts, old)
    assert any("NVIDIA driver 570.86.10" in p for p in check(plan))
    assert not any(
        "NVIDIA driver" in p for p in check(make_plan(train_config(*PRESET, override), facts, NODE))
    )


def test_zero3_counts_a_whole_checkpoint_per_rank_in_host_memory_while_loading(qwen7b):
    override, facts = qwen7b
    one = facts.params.total * 2  # bf16, the preset's dtype
    zero3 = make_plan(train_config(*PRESET, override, "learner.zero_stage=3"), facts, NODE)
    ranks = zero3.cfg.cluster.learner_ranks
    assert zero3.zero3_load_host == min(ranks, NODE.gpus_per_node) * one
    assert "while the learners load (ZeRO-3" in render(zero3)
    zero2 = make_plan(train_config(*PRESET, override, "learner.zero_stage=2"), facts, NODE)
    assert zero2.zero3_load_host == 0 and "while the learners load" not in render(zero2)
    # A machine whose memory holds the actors but not a checkpoint per rank besides.
    small = dataclasses.replace(
        NODE, single_node=True, host_memory=zero3.host_needed + zero3.zero3_load_host / 2
    )
    plan = make_plan(train_config(*PRESET, override, "learner.zero_stage=3"), facts, small)
    (problem,) = [p for p in check(plan) if "while the learners load" in p]
    assert "learner.zero_stage=2" in problem


def test_a_kv_cache_below_a_steps_longest_sequences_warns_of_preemption(qwen7b):
    # The preset: 128 prompts over 4 engines, 8 samples each: 256 sequences per engine (under
    # vLLM's default of 1024 on an 80 GB GPU), up to 6008 tokens each, against 896,113 tokens.
    (note,) = [n for n in plan_of(qwen7b).notes if "preempts" in n]
    assert "a step's 256 sequences on one engine may need 1,538,048" in note
    assert "896,113 tokens per engine" in note
    assert not [
        n for n in plan_of(qwen7b, "rollout.vllm.max_num_seqs=128").notes if "preempts" in n
    ]


def test_a_micro_batch_too_large_to_train_is_refused_with_the_keys_to_change(qwen7b):
    # The states fit; 16 uncheckpointed sequences of 6008 tokens do not.
    plan = plan_of(qwen7b, "learner.micro_batch_size=16", "model.gradient_checkpointing=false")
    (problem,) = [p for p in check(plan) if "while it trains" in p]
    assert bytes_text(plan.learner_training) in problem
    assert "activations (16 x 6008 tokens)" in problem
    assert "learner.micro_batch_size" in problem and "model.gradient_checkpointing" in problem
    assert check(plan_of(qwen7b, "learner.micro_batch_size=16")) == []  # checkpointed: fits


def test_colocated_engines_that_stay_awake_count_beside_the_training_learner(qwen7b):
    share = ("rollout.vllm.gpu_memory_utilization=0.4",)
    asleep = plan_of(qwen7b, *MM_EUREKA, *share)
    assert asleep.engine_sleeps and check(asleep) == []
    awake = plan_of(qwen7b, *MM_EUREKA, *share, "rollout.vllm.enable_sleep_mode=false")
    assert not awake.engine_sleeps
    assert awake.gpu_peak == pytest.approx(awake.learner_training + 0.4 * H100)
    (problem,) = [p for p in check(awake) if p.startswith("colocated")]
    assert "engine 31.67 GiB" in problem and "rollout.vllm.enable_sleep_mode" in problem


@pytest.mark.parametrize(
    ("stage", "bf16", "on_gpu", "elements", "width"),
    [
        (0, False, True, 10**8, 4),  # whole gradients all-reduced: at most the gradients
        (1, True, True, 10**8, 4),  # BF16_Optimizer: fp32 accumulators, one bucket
        (2, True, True, 5 * 10**8, 2),  # the contiguous 16-bit reduce buffer, allocated whole
        (3, True, True, 5 * 10**8, 2),
        (3, False, False, 10**8, 4),  # on CPU only what the gradients fill is touched
    ],
)
def test_deepspeeds_gradient_bucket_is_its_default_size_in_the_reducing_dtype(
    stage, bf16, on_gpu, elements, width
):
    from gmai_rl.plan.memory import deepspeed_buffers

    got = deepspeed_buffers(stage, bf16, weight_bytes=4, trainable=10**8, on_gpu=on_gpu)
    assert got == elements * width


# ----------------------------------------------------------------------------- LoRA, 1 GPU

ONE_GPU = Hardware(
    gpus_per_node=1,
    gpu_memory=H100,
    source="one 80 GB GPU",
    single_node=True,
    host_memory=128 * GIB,
)


def lora_plan(tmp_path_factory, *overrides):
    path = write_qwen2_5_vl_7b_config(tmp_path_factory.mktemp("qwen2_5_vl_7b_lora"))
    cfg = train_config(
        "+experiment=gmai_vl_r1_7b_lora_1gpu",
        "data.root=/data/GMAI-Reasoning10K",
        f"model.path={path}",
        *overrides,
    )
    return make_plan(cfg, read_model(cfg.model), ONE_GPU)


def test_the_7b_lora_preset_fits_one_80_gb_gpu_with_its_engine(tmp_path_factory):
    plan = lora_plan(tmp_path_factory)
    assert check(plan) == []
    p = plan.model.params
    # Rank-64 adapters on the 28 layers' 7 projections: r x (in + out) each.
    per_layer = 64 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert p.trainable == 28 * per_layer
    # bf16 base weights frozen; the adapters' fp32 gradients, master weights and moments.
    assert plan.learner_total.device == pytest.approx(2 * p.total + 16 * p.trainable)
    assert plan.reference is None  # kl_coef 0 (a LoRA reference is a copy of the adapters)
    # Only the adapters travel: less than one 512 MiB bucket, in bf16.
    assert sum(m.device for m in plan.push.values()) == 2 * p.trainable
    assert plan.engine_receive == 2 * p.trainable
    # The engine sleeps (level 1) while the learner trains; awake, it takes its 60% in a push.
    assert plan.engine_sleeps
    assert plan.gpu_peak == pytest.approx(
        max(plan.learner_training, plan.learner_pushing + 0.6 * H100 + plan.engine_receive)
    )
    assert plan.gpu_peak < H100
    assert plan.kv_sequences >= 1
    assert "fits: yes" in render(plan)


def test_without_lora_the_same_layout_does_not_fit_one_gpu(tmp_path_factory):
    problems = check(lora_plan(tmp_path_factory, "model.lora.enabled=false"))
    assert any("learner rank" in p and "79.18 GiB" in p for p in problems), problems
