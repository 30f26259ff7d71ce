"""Fixtures of the integration tier: a small trainer config on the tiny model and data."""

import pytest

from support import train_config


@pytest.fixture(scope="session")
def small_config(tiny_model_dir, synthetic_dir):
    """Build a TrainConfig from conf/ with test-sized overrides: small_config(out_dir, *overrides)."""

    def build(out_dir, *overrides):
        return train_config(
            f"model.path={tiny_model_dir}",
            "model.build_tiny_if_missing=false",
            f"data.synthetic.dir={synthetic_dir}",
            f"trainer.output_dir={out_dir}",
            "algo.prompts_per_step=4",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=8",
            "learner.micro_batch_size=4",
            "sft.steps=2",
            "sft.batch_size=8",
            "sync.verify=true",
            "sync.timeout_s=120",
            "algo.max_refill_rounds=0",
            *overrides,
        )

    return build
