import pytest
import torch
from hypothesis import settings

# Property tests: a few seconds in CI, no deadline (a busy machine is not a slow parser).
# `pytest --hypothesis-profile=deep` searches harder before a release or after a parser change.
settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile("deep", max_examples=5000, deadline=None)
settings.load_profile("default")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full-size models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _eager_cli():
    """CLI and server tests run eager: `auto` would convert every fresh random model with OpenVINO."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENLDM_ENGINE", "eager")
        yield


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """Hashes and engine programs of the tests' throwaway models stay out of the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENLDM_CACHE", str(tmp_path_factory.mktemp("openldm-cache")))
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy CPU the hand-offs cost 20x the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
