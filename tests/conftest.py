"""Shared data fixtures: one small synthetic world per test session (64 genes, generated in ~1 s).

The tests' programs are tiny and compiled once each, so XLA's CPU backend optimizations cost far more
than they save: level 0 makes the suite about twice as fast, in this process, its xdist workers and the
CLI subprocesses (they inherit the environment). On jaxlib 0.10, XLA:CPU's older elemental emitters
compile these programs in about half the time of its MLIR fusion emitters (suite 325 -> 242 s on 2
cores); later XLA retires that switch, and an XLA flag it does not know aborts the process, so the
flag is set only there. Semantics are unchanged.
"""

import atexit
import importlib.metadata
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from scp_jax.data.synth import make_world

FAST_COMPILE = "--xla_backend_optimization_level=0"
if importlib.metadata.version("jaxlib").startswith("0.10."):
    FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
# Features computed by the code under test, not read from a cache an earlier version filled.
os.environ["SCP_JAX_CACHE"] = tempfile.mkdtemp(prefix="scp_jax_cache_")
atexit.register(shutil.rmtree, os.environ["SCP_JAX_CACHE"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "configs" / "ci.toml"
REFERENCE = ROOT.parent / "shared/data/op2"


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 64-gene world; tests must copy files before changing them."""
    return make_world(tmp_path_factory.mktemp("world"), genes=64, seed=0)


@pytest.fixture
def reference_dir():
    if not (REFERENCE / "genes.txt").is_file():
        pytest.skip(f"reference data not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture
def free_address():
    """A function giving localhost:PORT on a free port, for a JAX distributed run of local processes."""
    def address():
        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            return f"localhost:{probe.getsockname()[1]}"
    return address


@pytest.fixture
def cli_error(capsys):
    """A function running a CLI `main(argv)` that must fail as a user error: exit code 2 and exactly one stderr line,
    starting with 'error: ' (no traceback), holding each of `fragments`. Returns that line, stripped."""
    def run(main, argv, *fragments):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv])
        error = capsys.readouterr().err
        assert exit_.value.code == 2, (exit_.value.code, error)
        assert error.startswith("error: ") and error.endswith("\n") and error.count("\n") == 1, error
        for fragment in fragments:
            assert fragment in error, (fragment, error)
        return error.strip()
    return run
