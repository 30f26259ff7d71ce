"""Presets (full-size recipes and the shuffled-options demo) carry their own recipe: composed, they
hold exactly the documented values, and each recipe value is written in the preset itself, so a
change of the demo's defaults (the schema's) can never leak into a 7B run or the preset."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gmai_rl.config_checks import validate
from gmai_rl.train import CONF_DIR
from support import train_config

# The table in conf/experiment/gmai_vl_r1_7b.yaml's header (MM-EUREKA's Qwen2.5-VL-7B script).
RECIPES = {
    "gmai_vl_r1_7b": {
        "rollout.samples_per_prompt": 8,
        "rollout.temperature": 1.0,
        "rollout.top_p": 1.0,
        "rollout.max_new_tokens": 4096,
        "algo.prompts_per_step": 128,
        "algo.estimator": "grpo",
        "algo.accuracy_filter": True,
        "algo.filter_low": 0.1,
        "algo.filter_high": 0.9,
        "algo.loss.clip_eps_low": 0.2,
        "algo.loss.clip_eps_high": 0.2,
        "algo.loss.dual_clip_c": 3.0,
        "algo.loss.loss_agg": "seq-mean-token-mean",
        "algo.loss.kl_coef": 0.0,
        "learner.num_minibatches": 8,
        "learner.micro_batch_size": 2,
        "learner.ppo_epochs": 1,
        "learner.grad_clip": 1.0,
        "learner.bf16": True,
        "optim.lr": 5e-7,
        "optim.min_lr_ratio": 0.1,
        "optim.warmup_steps": 96,
        "model.freeze_vision": True,
        "trainer.save_every": 50,
        "trainer.steps": 400,
    },
    # conf/experiment/demo_shuffled.yaml: the demo with shuffled options (its header says why).
    "demo_shuffled": {
        "data.synthetic.shuffle_options": True,
        "data.synthetic.sft_answers": "check",
        "sft.steps": 600,
        "rollout.max_new_tokens": 96,
        "optim.lr": 5e-4,
        "trainer.steps": 200,
        "trainer.eval_every": 50,
    },
    # conf/experiment/gmai_vl_r1_7b_lora_1gpu.yaml: the 7B recipe with LoRA on one GPU (what
    # it changes and why: its header; the rest is gmai_vl_r1_7b's, composed in).
    "gmai_vl_r1_7b_lora_1gpu": {
        "model.lora.enabled": True,
        "model.lora.rank": 64,
        "model.lora.alpha": 128,
        "optim.lr": 5e-6,
        "algo.prompts_per_step": 32,
        "learner.zero_stage": 2,
        "learner.num_minibatches": 2,
        "cluster.learner_ranks": 1,
        "cluster.rollout_workers": 1,
        "cluster.colocate": True,
        "rollout.vllm.enable_sleep_mode": True,
        "rollout.vllm.sleep_level": 1,
        "rollout.vllm.gpu_memory_utilization": 0.6,
    },
    # conf/experiment/demo_lora.yaml: the demo's RL with LoRA on a cold-started model.
    "demo_lora": {
        "model.lora.enabled": True,
        "model.lora.rank": 16,
        "model.lora.alpha": 32,
        "sft.enabled": False,
        "optim.lr": 3e-3,
    },
    # conf/experiment/demo_rounds.yaml: the demo in two rounds (its header says how).
    "demo_rounds": {
        "trainer.rounds": 2,
        "trainer.steps": 60,
        "trainer.eval_every": 0,
        "synth.k": 4,
        "synth.max_items": 512,
        "synth.sft_steps": 40,
    },
}


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_preset_has_a_recipe_table():
    presets = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert presets == set(RECIPES)


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_a_preset_composes_to_its_recipe(preset):
    cfg = train_config(f"+experiment={preset}", "data.root=/data/gmai")
    validate(cfg)
    got = {key: _get(cfg, key) for key in RECIPES[preset]}
    assert got == RECIPES[preset]
    # The schedule decays over every optimizer step of the run.
    assert cfg.rl_optim.total_steps == cfg.trainer.steps * cfg.learner.num_minibatches


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_every_recipe_value_is_written_in_the_preset_itself(preset):
    written = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR, "experiment", f"{preset}.yaml")))
    model_group = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "qwen2_5_vl_7b.yaml"))

    def in_file(key):
        node = written
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [
        key
        for key in RECIPES[preset]
        if not in_file(key) and not (key.startswith("model.") and key[6:] in model_group)
    ]
    assert missing == []
