"""Fixtures of the integration tier: a small trainer config on the tiny model and data; a pair
of learner ranks that serve one module's tests in turn (tests/learner_ranks.py)."""

import os

import pytest

import learner_ranks
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


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance for one module's learner ranks, which import tests/learner_ranks.py."""
    ray = pytest.importorskip("ray")
    tests_dir = os.path.dirname(learner_ranks.__file__)
    path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    env_vars = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": path}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env_vars})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def learner_pair(local_ray):
    pair = learner_ranks.LearnerPair()
    yield pair
    pair.discard()


@pytest.fixture
def learners(learner_pair, request):
    """learners(model, learner_options, loss_options=kl_coef 0): the two ranks, as new
    `Learner`s of that configuration would be."""
    failed_before = request.session.testsfailed
    yield learner_pair.build
    if request.session.testsfailed > failed_before:
        # A failed test may have left a rank inside a collective, or half-built: the next test
        # gets new processes.
        learner_pair.discard()
