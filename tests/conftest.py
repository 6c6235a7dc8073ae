"""Shared fixtures: the tiny random Qwen-Image is built once per session (imports cost ~10 s)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# datasets (and its lock files) stay out of ~/.cache: a per-session temporary cache
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(__import__("tempfile").mkdtemp(prefix="hf-datasets-"), "cache"))
# pytest.ini runs the suite on 2 workers (pytest-xdist): one torch thread each (and in the processes a
# test launches), so 2 workers fill 2 cores instead of oversubscribing them 2x. `-n 0` runs it in
# one process with torch's default threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny pipeline saved with save_pretrained: loaded back as a user loads Qwen/Qwen-Image."""
    import qwen_image

    path = tmp_path_factory.mktemp("tiny-qwen-image")
    qwen_image.build_tiny_pipeline(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture()
def tiny_pipe(tiny_dir):
    """A fresh fp32 tiny pipeline per test (loading takes ~0.1 s), so tests cannot leak state."""
    import torch
    import qwen_image

    return qwen_image.load_pipeline(tiny_dir, dtype=torch.float32, device="cpu")
