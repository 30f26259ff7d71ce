"""How a learner rank is set up, without starting one: DeepSpeed configs, devices, attention."""

import pytest
import torch

from gmai_rl.cluster.actors import rollout_device
from gmai_rl.learner.deepspeed_config import deepspeed_config, reference_config
from gmai_rl.learner.options import LearnerOptions
from gmai_rl.models.device import require_cuda
from gmai_rl.models.loading import check_attn_implementation
from support import train_config


def test_bf16_training_accumulates_gradients_in_fp32():
    assert deepspeed_config(LearnerOptions(bf16=True), 4)["data_types"] == {
        "grad_accum_dtype": "fp32"
    }
    assert "data_types" not in deepspeed_config(LearnerOptions(bf16=False), 4)
    # The frozen reference has no gradients to accumulate.
    assert "data_types" not in reference_config(LearnerOptions(bf16=True), 4)


@pytest.mark.parametrize(
    ("stage", "offload", "ref_stage"), [(2, False, 0), (3, False, 3), (2, True, 3), (3, True, 3)]
)
def test_the_reference_is_a_replica_unless_partitioned_or_offloaded(stage, offload, ref_stage):
    config = reference_config(LearnerOptions(zero_stage=stage, reference_offload=offload), 4)
    zero = config["zero_optimization"]
    assert zero["stage"] == ref_stage
    assert ("offload_param" in zero) is offload
    if offload:
        assert zero["offload_param"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without a GPU")
def test_a_rank_given_a_gpu_without_working_cuda_stops_naming_itself_and_the_cause():
    with pytest.raises(RuntimeError) as err:
        require_cuda("learner rank 3")
    message = str(err.value)
    assert message.startswith("learner rank 3: the configuration gives it a GPU")
    assert f"torch {torch.__version__}" in message and "CUDA_VISIBLE_DEVICES" in message
    assert "gpus_per_learner" in message


def test_auto_rollout_device_follows_the_placement_not_the_node():
    assert rollout_device(train_config()) == "cpu"
    assert rollout_device(train_config("cluster.gpus_per_rollout_worker=1")) == "cuda"
    assert (
        rollout_device(train_config("rollout.device=cpu", "cluster.gpus_per_rollout_worker=1"))
        == "cpu"
    )


def test_an_attention_backend_that_is_not_installed_fails_at_start_up_naming_its_package():
    for name in (None, "sdpa", "eager"):
        check_attn_implementation(name)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs the flash-attn package") as err:
            check_attn_implementation("flash_attention_2")
        assert "model.attn_implementation=sdpa" in str(err.value)
    else:
        check_attn_implementation("flash_attention_2")


def test_the_full_size_model_presets_use_an_attention_backend_every_gpu_node_has():
    for preset in ("qwen2_5_vl_7b", "qwen2_5_vl_3b"):
        cfg = train_config(f"model={preset}")
        assert cfg.model.attn_implementation == "sdpa"
