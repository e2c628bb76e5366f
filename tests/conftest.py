"""Shared data fixtures: one small synthetic world per test session (64 genes, generated in ~1 s)."""

from pathlib import Path

import pytest

from scp_jax.data.synth import make_world

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared/data/op2"


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 64-gene world; tests must copy files before changing them."""
    return make_world(tmp_path_factory.mktemp("world"), genes=64, seed=0)


@pytest.fixture
def reference_dir():
    if not (REFERENCE / "genes.txt").is_file():
        pytest.skip(f"reference data not found at {REFERENCE}")
    return REFERENCE
