"""Shared test setup: one torch thread per process (2-core machines oversubscribe otherwise)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def cpu_attention_kernel():
    """The CPU attention kernel, loaded (built by `make install`) before any test points the
    coralline cache elsewhere: a test's own cache would otherwise build it again (~1 min)."""
    from coralline.batching import cpu_attention

    return cpu_attention.kernel()


@pytest.fixture(scope="session")
def smollm2():
    """The real target (SmolLM2-135M-Instruct, fp32 CPU), loaded once per test session."""
    from coralline.target import TargetRunner

    return TargetRunner.load()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA exists; elsewhere they are skipped (and reported as such)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port for the test session (`make test` installs
    the Debian package when it is missing)."""
    from .redis_servers import own_redis

    with own_redis(tmp_path_factory.mktemp("redis"), "--appendonly", "no") as server:
        yield server.url


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """(target folder, CORAL head folder) for a tiny Llama (V = 8, 256-token context)."""
    from coralline.draft.coral import CoralHead, config_for_target

    from .tiny import tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(8, seed=21, scale=3.0)  # V = 8: tests/rpc and tests/telemetry
    model.save_pretrained(root / "target")
    torch.manual_seed(5)
    head = CoralHead(config_for_target(model, "tiny", num_groups=4, active_groups=2))
    head.attach(model)
    head.init_groups()
    head.save(root / "head")
    return str(root / "target"), str(root / "head")
