import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """One saved tiny random HF model per architecture: {arch: path}."""
    from tests.helpers.tiny_models import TINY_ARCHS, make_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_hf")
    dirs = {}
    for i, arch in enumerate(TINY_ARCHS):
        make_tiny_hf_model(arch, root / arch, seed=i)
        dirs[arch] = str(root / arch)
    return dirs


@pytest.fixture(scope="session")
def tiny_moe_dirs(tmp_path_factory):
    """Saved tiny random Qwen3-MoE models (top-k renormalised and not): {arch: path}."""
    from tests.helpers.tiny_models import TINY_MOE_ARCHS, make_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_moe")
    dirs = {}
    for i, arch in enumerate(TINY_MOE_ARCHS):
        make_tiny_hf_model(arch, root / arch, seed=10 + i)
        dirs[arch] = str(root / arch)
    return dirs
