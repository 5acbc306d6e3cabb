"""Shared fixtures: one tiny random checkpoint per test session, and that model loaded on CPU."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny checkpoint folder in the official layout (preprocessor num_crops = 2)."""
    from phi3v.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_crops=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """`tiny_model_dir` loaded with phi3v.load on CPU in float32 (shared: do not mutate it)."""
    import phi3v

    return phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
