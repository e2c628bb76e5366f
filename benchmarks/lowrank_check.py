"""The fused low-rank AdamW kernel against XLA's unfused maths, on the device it would run on.

The tests run the kernel interpreted on a CPU; this runs it compiled (Triton on a GPU) on W20's
head (1024 x 18211, 32 rows, 3 members) and records, per precision and array, the largest
difference from optim.adamw on the dense gradient and the fraction of elements that differ. Both
form x^T dy at the default precision (TF32 on a GPU); summation order and Triton's approximate
division still move some values by an ulp. Then it counts the parameter-sized copies XLA puts in
the compiled W20 chunk, dense and low-rank.

  python benchmarks/lowrank_check.py --out benchmarks/results/lowrank-check-gpu.json

Exits 1 unless the kernel ran (one GPU) and agreed, so gpu_check.sh can leave it out of the timing.
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from scp_jax.atomic import write_text
from scp_jax.engine import lowrank, optim


def compare(dtype, members=3, n_in=1024, n_out=18211, rows=32):
    """Each member has its own rate; the middle one is frozen (`active` False), as in the engine."""
    keys = jax.random.split(jax.random.key(0), 5)
    p, m = (jax.random.normal(k, (members, n_in, n_out)).astype(dtype) for k in keys[:2])
    v = jnp.abs(jax.random.normal(keys[2], (members, n_in, n_out))).astype(dtype) * 0.01
    x, dy = jax.random.normal(keys[3], (members, rows, n_in)), jax.random.normal(keys[4], (members, rows, n_out))
    rate = 1e-3 * jnp.arange(1, members + 1, dtype=jnp.float32)
    active = jnp.arange(members) % 2 == 0
    seed = jnp.arange(members, dtype=jnp.uint32) if dtype == jnp.bfloat16 else None

    def scalars(rate, active):  # clip scale, rate, weight decay, bias corrections, active
        return 0.5, rate, 1e-4, 0.19, 0.0199, active

    def fused(p, m, v, x, dy, rate, active, seed):
        return lowrank.fused_update(optim.adamw, p, m, v, lowrank.Factored(x, dy), scalars(rate, active), seed)

    def unfused(p, m, v, x, dy, rate, active, seed):
        g = jnp.matmul(x.T, dy)  # default precision, like the kernel
        new = optim.adamw(p.astype(jnp.float32), g, m.astype(jnp.float32), v.astype(jnp.float32),
                          *scalars(rate, active))
        return optim.store_leaf(new, dtype, seed)

    in_axes = (0,) * 7 + (None if seed is None else 0,)
    got = jax.jit(jax.vmap(fused, in_axes))(p, m, v, x, dy, rate, active, seed)
    want = jax.jit(jax.vmap(unfused, in_axes))(p, m, v, x, dy, rate, active, seed)
    out = {}
    for name, a, b, old in zip(("params", "mu", "nu"), got, want, (p, m, v)):
        a, b, old = (np.asarray(t, np.float32) for t in (a, b, old))
        out[name] = {"max_abs_diff": float(np.abs(a - b).max()), "fraction_differing": float((a != b).mean()),
                     "max_abs": float(np.abs(b).max()), "max_update": float(np.abs(b - old).max()),
                     "frozen_member_unchanged": bool((a[1] == old[1]).all())}
    return out


def agrees(precision, arrays):
    """Both sides form x^T dy from the same TF32-rounded inputs, so they differ by summation order and
    Triton's approximate division: about 1e-6 of a value. In fp32 a wrong rate, decay or bias
    correction moves the update by a large part of itself; in bf16 state, stochastic rounding turns
    a tiny difference into one bf16 ulp, rarely, and a wrong update into many."""
    def ok(a):
        if precision == "fp32":
            close = a["max_abs_diff"] <= 1e-2 * a["max_update"]
        else:
            close = a["fraction_differing"] <= 1e-3 and a["max_abs_diff"] <= 2.0**-7 * a["max_abs"]
        return close and a["frozen_member_unchanged"]
    return "error" not in arrays and all(ok(a) for a in arrays.values())


def param_copies(members=2):
    """Copies of member-stacked head-sized arrays in the compiled W20 chunk, dense and low-rank: XLA
    adds one when it cannot update an aliased buffer in place, and each would undo part of the
    saving the access count assumes."""
    from throughput import WORKLOADS, compile_chunk, workload_data

    w = WORKLOADS["full"]
    data = workload_data(w)
    shape = f"[{members},{w['hidden'][-1]},{w['genes']}]"
    counts = {}
    for variant in ("fp32", "fp32+lowrank"):
        hlo = compile_chunk(w, data, members, variant).compiled.as_text()
        counts[variant] = sum(_copies(line, shape) for line in hlo.splitlines())
    return counts


def _copies(hlo_line, shape):
    """1 if the instruction copies an array of `shape` ("[2,1024,18211]"), else 0."""
    result, _, op = hlo_line.partition(" = ")[2].partition(" ")
    return int(shape + "{" in result and op.startswith(("copy(", "copy-start(")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    impl = lowrank.default_impl()
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "lowrank_impl": impl}
    if impl == "pallas":
        for name, dtype in (("fp32", jnp.float32), ("bf16_state", jnp.bfloat16)):
            try:
                results[name] = compare(dtype)
            except Exception as err:  # a kernel Triton refuses: record it for the note, go on
                results[name] = {"error": str(err).splitlines()[0][:300]}
            print(name, results[name], flush=True)
    results["ok"] = impl == "pallas" and all(agrees(name, results[name]) for name in ("fp32", "bf16_state"))
    if results["ok"]:
        results["param_sized_copies"] = param_copies()
        print("param-sized copies", results["param_sized_copies"], flush=True)
    write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
