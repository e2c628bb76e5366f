"""The fused low-rank AdamW kernel against XLA's unfused maths, on the device it would run on.

The tests run the kernel interpreted on a CPU; this runs it compiled (Triton on a GPU) on W20's
head (1024 x 18211, 32 rows, 3 members) and records, per precision and array, the largest
difference from optim.adamw on the dense gradient and the fraction of elements that differ. Both
form x^T dy at the default precision (TF32 on a GPU), so only the summation order differs.

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
from scp_jax.precision import store

SCALARS = (0.5, 1e-3, 1e-4, 0.19, 0.0199, True)  # clip scale, rate, weight decay, bias corrections, active


def compare(dtype, members=3, n_in=1024, n_out=18211, rows=32):
    keys = jax.random.split(jax.random.key(0), 5)
    p, m = (jax.random.normal(k, (members, n_in, n_out)).astype(dtype) for k in keys[:2])
    v = jnp.abs(jax.random.normal(keys[2], (members, n_in, n_out))).astype(dtype) * 0.01
    x, dy = jax.random.normal(keys[3], (members, rows, n_in)), jax.random.normal(keys[4], (members, rows, n_out))
    seed = jnp.arange(members, dtype=jnp.uint32) if dtype == jnp.bfloat16 else None

    def fused(p, m, v, x, dy, seed):
        return lowrank.fused_update(optim.adamw, p, m, v, lowrank.Factored(x, dy), SCALARS, seed)

    def unfused(p, m, v, x, dy, seed):
        g = jnp.matmul(x.T, dy)  # default precision, like the kernel
        new = optim.adamw(p.astype(jnp.float32), g, m.astype(jnp.float32), v.astype(jnp.float32), *SCALARS)
        return [store(a, dtype, None if seed is None else seed + jnp.uint32(k)) for k, a in enumerate(new)]

    in_axes = (0, 0, 0, 0, 0, None if seed is None else 0)
    got = jax.jit(jax.vmap(fused, in_axes))(p, m, v, x, dy, seed)
    want = jax.jit(jax.vmap(unfused, in_axes))(p, m, v, x, dy, seed)
    out = {}
    for name, a, b in zip(("params", "mu", "nu"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        out[name] = {"max_abs_diff": float(np.abs(a - b).max()), "fraction_differing": float((a != b).mean()),
                     "max_abs": float(np.abs(b).max())}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    kernel = lowrank.update_kernel()
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "update_kernel": kernel}
    if kernel == "pallas":
        for name, dtype in (("fp32", jnp.float32), ("bf16_state", jnp.bfloat16)):
            try:
                results[name] = compare(dtype)
            except Exception as err:  # a kernel Triton refuses: record it for the note, go on
                results[name] = {"error": str(err).splitlines()[0][:300]}
            print(name, results[name], flush=True)
    # Rounding and summation order move a value by an ulp or so; a wrong tile moves it by O(1).
    results["ok"] = kernel == "pallas" and all(
        "error" not in results[name] and all(a["max_abs_diff"] <= 1e-2 * a["max_abs"] for a in results[name].values())
        for name in ("fp32", "bf16_state"))
    write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
