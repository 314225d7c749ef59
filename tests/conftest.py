"""Test-session settings shared by every test module."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _kif_cache(tmp_path_factory):
    """Cached key statistics (kif.erasure.stats) go to a fresh folder per session, never to the
    user's ~/.cache: every test run starts cold and leaves nothing behind."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KIF_CACHE", str(tmp_path_factory.mktemp("kif-cache")))
    yield
    mp.undo()
