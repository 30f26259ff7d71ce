"""`model.lora`: its options, what gets adapters, the configurations it refuses, adapter folders."""

import json

import pytest

from gmai_rl.config_checks import validate
from gmai_rl.models.loading import ModelOptions, load_model
from gmai_rl.models.lora import LoraOptions, adapter_base, adapter_names
from gmai_rl.rollout.options import max_lora_rank
from gmai_rl.rollout.vllm_lora import peft_file_name
from support import train_config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"targets": []}, "targets is empty"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=f"model.lora.{message}"):
        LoraOptions(**kwargs)


def test_a_vllm_sleep_that_drops_the_base_is_refused_for_lora():
    sleeps = ("rollout.vllm.enable_sleep_mode=true", "cluster.colocate=true")
    cfg = train_config(
        "model.lora.enabled=true", "rollout.backend=vllm", "rollout.vllm.sleep_level=2", *sleeps
    )
    with pytest.raises(ValueError, match=r"model.lora.enabled with rollout.vllm.sleep_level=2"):
        validate(cfg)
    cfg = train_config("model.lora.enabled=true", "rollout.backend=vllm", *sleeps)
    try:
        validate(cfg)
    except ValueError as err:  # other rules of a CPU layout may object; not this one
        assert "sleep_level" not in str(err)


@pytest.mark.parametrize(("rank", "served"), [(1, 1), (4, 8), (8, 8), (33, 64), (512, 512)])
def test_vllm_serves_each_rank_with_the_smallest_max_lora_rank_that_holds_it(rank, served):
    assert max_lora_rank(rank) == served


def test_a_rank_above_what_vllm_serves_is_refused():
    with pytest.raises(ValueError, match="rank <= 512"):
        max_lora_rank(513)
    with pytest.raises(ValueError, match=r"model\.lora\.rank=600"):
        validate(
            train_config("model.lora.enabled=true", "model.lora.rank=600", "rollout.backend=vllm")
        )


def test_adapter_tensors_are_written_under_the_names_peft_saves():
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert peft_file_name(name) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match="not a LoRA adapter parameter"):
        peft_file_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")


@pytest.mark.parametrize("vision", [False, True])
def test_adapters_sit_on_the_language_model_unless_the_vision_tower_is_asked_for(
    tiny_model_dir, vision
):
    lora = LoraOptions(enabled=True, rank=2, vision=vision)
    model = load_model(ModelOptions(tiny_model_dir, lora=lora))
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_names(names))
    decoder_layers = {n.split(".self_attn.")[0] for n in trainable if ".self_attn." in n}
    assert len(decoder_layers) == model.config.get_text_config().num_hidden_layers
    assert {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[1] for n in trainable} == set(lora.targets)
    assert any(".visual." in n for n in trainable) is vision


def test_an_adapter_folder_names_its_base(tmp_path):
    assert adapter_base(tmp_path) is None  # a model folder (or anything else)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "b"}))
    assert adapter_base(tmp_path) == "b"
    assert ModelOptions(str(tmp_path)).weights_path == "b"
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"adapter_config\.json: not a PEFT adapter config"):
        adapter_base(tmp_path)
