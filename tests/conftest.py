"""Shared fixtures. Tests never touch the network: models and data are built locally."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An offline tiny Qwen2.5-VL (random weights, local tokenizer, full processor)."""
    from gmai_rl.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small synthetic dataset in GMAI-Reasoning10K format."""
    from gmai_rl.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(
        out, n_train=64, n_eval=16, seed=0, tasks=["lesion_quadrant"], sft_answers="random"
    )
    return out
