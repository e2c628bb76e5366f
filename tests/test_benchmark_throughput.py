"""The throughput benchmark's pieces on a tiny workload, so they cannot drift from the engine unseen
until a GPU lease runs them (benchmarks/gpu_check.sh)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import lowrank_check  # noqa: E402  (benchmarks/lowrank_check.py)
import throughput  # noqa: E402  (benchmarks/throughput.py)

TINY = dict(features=8, hidden=(8,), genes=16, rows=60, batch=8, epochs=2, reps=1)


def test_a_variant_compiles_runs_and_counts_its_bytes():
    """bf16 state with low-rank gradients: the variant with the most options (XLA's product on a CPU)."""
    result = throughput.run_ensemble(TINY, throughput.workload_data(TINY), 2, "bf16_state+lowrank")
    assert (result["members"], result["lowrank_impl"], result["steps_per_epoch"]) == (2, "xla", 6)  # 48 rows / 8
    assert result["member_epochs_per_s"] > 0 and result["program_bytes"] > 0
    accesses = 6 * throughput.ACCESSES_PER_STEP["xla"] + throughput.ACCESSES_PER_EPOCH
    n_params = 8 * 8 + 8 + 8 * 16 + 16
    assert throughput.roofline(TINY, result, bandwidth=1e9)["bytes_per_member_epoch"] == accesses * n_params * 2


def test_lowrank_check_accepts_rounding_and_refuses_a_wrong_update():
    def arrays(diff, differing=0.0):
        return {"params": {"max_abs_diff": diff, "fraction_differing": differing, "max_abs": 4.0, "max_update": 0.01,
                           "frozen_member_unchanged": True}}
    assert lowrank_check.agrees("fp32", arrays(1e-7))
    assert not lowrank_check.agrees("fp32", arrays(5e-3))  # half an update: a wrong rate or decay
    assert lowrank_check.agrees("bf16_state", arrays(2.0**-7, differing=1e-4))  # rare one-ulp rounding flips
    assert not lowrank_check.agrees("bf16_state", arrays(2.0**-7, differing=0.05))
    assert not lowrank_check.agrees("fp32", {"error": "Triton refused"})
