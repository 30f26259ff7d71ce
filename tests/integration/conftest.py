"""Fixtures of the integration tier: a small trainer config on the tiny model and data."""

import pytest

from support import TEST_SIZE, train_config


@pytest.fixture(scope="session")
def small_config(tiny_model_dir, synthetic_dir, tmp_path_factory):
    """Build a TrainConfig from conf/ with test-sized overrides: small_config(out_dir, *overrides)."""
    # Not the user's artifacts cache: it would collect records of this session's temporary images.
    image_checks = tmp_path_factory.mktemp("cache") / "image-checks.json"

    def build(out_dir, *overrides):
        return train_config(
            f"model.path={tiny_model_dir}",
            "model.build_tiny_if_missing=false",
            f"data.synthetic.dir={synthetic_dir}",
            f"data.image_check_cache={image_checks}",
            f"trainer.output_dir={out_dir}",
            *TEST_SIZE,
            "sync.verify=true",
            "sync.timeout_s=120",
            *overrides,
        )

    return build
