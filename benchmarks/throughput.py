"""Training throughput of the vmapped ensemble against the memory roofline and naive baselines.

Workload W20 (issue 3): 20 members, MLP 1024 -> 1024 -> 1024 -> 18211 (ReLU) on 1024 input
features, batch 32, 491 training rows per member (614 rows, 5 folds), AdamW + global-norm clip 1.0.
The optimizer step is memory-bound, so the ceiling is bytes moved per step / device bandwidth:

  per parameter and step: forward read W, backward read W (for dX), write dW, read dW for the
  clip norm, update reads W, dW, mu, nu and writes W, mu, nu = 11 accesses
  (44 B in fp32, 22 B with bf16 parameters and state); per epoch add a validation forward and the
  best-parameter select (about 4 accesses). With low-rank kernel gradients ("+lowrank",
  engine/lowrank.py) the clip norm comes from the factors (10 accesses), and on one GPU the fused
  kernel forms dW inside the update, so dW never goes through memory (8). These counts are what
  the program asks for; where XLA fuses two of them, a run can pass its "roofline".

Bandwidth is measured in the same run with a chain of large on-device copies in one program. Baselines: the same jitted
chunk run one member at a time from a Python loop (JAX sequential), and when torch is importable
a plain PyTorch loop and a torch.func vmap ensemble.

  python benchmarks/throughput.py            # full workload (GPU)
  python benchmarks/throughput.py --quick    # small model for a CPU
"""

import argparse
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scp_jax.atomic import write_text
from scp_jax.config import load_config
from scp_jax.engine import lowrank
from scp_jax.engine.cv import kfold_assignment
from scp_jax.engine.ensemble import Data, Ensemble
from scp_jax.engine.members import MemberTable
from scp_jax.engine.trainer import member_specs
from scp_jax.features.tables import FeatureTables

ACCESSES_PER_STEP = {"dense": 11, "xla": 10, "pallas": 8}  # by how the update gets dW
ACCESSES_PER_EPOCH = 4
VARIANTS = ("fp32", "bf16", "bf16_state", "fp32+lowrank", "bf16_state+lowrank")
WORKLOADS = {
    "full": dict(features=1024, hidden=(1024, 1024), genes=18211, rows=614, batch=32, epochs=5, reps=3),
    "quick": dict(features=64, hidden=(64, 64), genes=512, rows=614, batch=32, epochs=4, reps=5),
}


def workload_data(w, seed=0):
    rng = np.random.default_rng(seed)
    n_compounds = 146
    tables = FeatureTables(cell=jnp.zeros((6, 0)), compound=jnp.asarray(rng.normal(size=(n_compounds, w["features"])),
                                                                          jnp.float32),
                           fold_cell=jnp.zeros((6, 6, 0)), fold_compound=jnp.zeros((6, n_compounds, 0)))
    cell_index = np.arange(w["rows"], dtype=np.int32) % 6
    compound_index = rng.integers(0, n_compounds, w["rows"]).astype(np.int32)
    targets = rng.standard_t(3, size=(w["rows"], w["genes"])).astype(np.float32)
    return Data(jnp.asarray(targets), jnp.asarray(cell_index), jnp.asarray(compound_index), tables)


def config_for(w, members, variant):
    """`variant`: a precision, with "+lowrank" for low-rank kernel gradients."""
    precision, _, lowrank = variant.partition("+")
    return load_config(None, [f"ensemble={members}", "folds=5", f"batch_size={w['batch']}",
                              f"model.hidden={list(w['hidden'])}", f"precision={precision}",
                              f"lowrank_grads={str(bool(lowrank)).lower()}", "optim.clip_norm=1.0",
                              "optim.weight_decay=1e-4"])


def n_params(w):
    sizes = (w["features"], *w["hidden"], w["genes"])
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def measure_bandwidth(n_bytes, copies=10, reps=5):
    """Bytes read + written per second by a chain of `copies` elementwise copies of an `n_bytes`
    array in one program, best of `reps`: dispatch and allocation, which timing one copy per call
    counted against the device, are spread over the chain."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    chain = jax.jit(lambda v: jax.lax.fori_loop(0, copies, lambda _, u: u * 1.0001, v))
    chain(x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        chain(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * copies * x.nbytes / min(times)


def run_ensemble(w, data, members, variant, member_table=None, tile=None):
    """Compile time and steady-state member-epochs/s of one chunk program; `tile`: the fused
    low-rank kernel's (lowrank.TILE) instead of the default."""
    default_tile = lowrank.TILE
    lowrank.TILE = tile or default_tile
    try:
        return _run_ensemble(w, data, members, variant, member_table)
    finally:
        lowrank.TILE = default_tile


class Chunk(NamedTuple):
    compiled: object  # (state, specs, data) -> (state, metrics): a chunk of w["epochs"] epochs
    compile_s: float
    state: object
    specs: object
    engine: Ensemble
    steps: int  # per epoch
    members: int


def compile_chunk(w, data, members, variant, member_table=None):
    """The chunk program of `members` training on workload `w` in `variant`, compiled."""
    config = config_for(w, members, variant)
    table = member_table or MemberTable.from_config(config, config.folds)
    fold_of_row = kfold_assignment(w["rows"], config.folds, config.seed)
    specs, _, steps = member_specs(config, table, fold_of_row)
    specs = jax.tree.map(jnp.asarray, specs)
    engine = Ensemble(config, data.tables.layout, w["genes"])
    state = engine.init(specs)
    start = time.perf_counter()
    compiled = engine.train_chunk.lower(state, specs, data, w["epochs"], steps).compile()
    return Chunk(compiled, time.perf_counter() - start, state, specs, engine, steps, len(table))


def _run_ensemble(w, data, members, variant, member_table):
    chunk = compile_chunk(w, data, members, variant, member_table)
    state, specs = chunk.state, chunk.specs
    state, metrics = chunk.compiled(state, specs, data)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(w["reps"]):
        start = time.perf_counter()
        state, metrics = chunk.compiled(state, specs, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    memory = chunk.compiled.memory_analysis()
    # The chunk's peak device memory: its arguments (the donated state, which its outputs reuse) and temporaries.
    program_bytes = None if memory is None else int(memory.argument_size_in_bytes + memory.temp_size_in_bytes)
    impl = chunk.engine.lowrank_impl if chunk.engine.program.lowrank_grads else "dense"
    return {"members": chunk.members, "variant": variant, "lowrank_impl": impl,
            "tile": lowrank.TILE if impl == "pallas" else None, "steps_per_epoch": chunk.steps,
            "compile_s": chunk.compile_s, "chunk_s": seconds, "member_epochs_per_s": chunk.members * w["epochs"] / seconds,
            "program_bytes": program_bytes}


def roofline(w, result, bandwidth):
    bytes_per_access = 2 if result["variant"].startswith("bf16_state") else 4
    accesses = result["steps_per_epoch"] * ACCESSES_PER_STEP[result["lowrank_impl"]] + ACCESSES_PER_EPOCH
    per_member_epoch = accesses * n_params(w) * bytes_per_access
    ceiling = bandwidth / per_member_epoch
    return {"bytes_per_member_epoch": per_member_epoch, "ceiling_member_epochs_per_s": ceiling,
            "roofline_fraction": result["member_epochs_per_s"] / ceiling}


def jax_sequential(w, data, members):
    """The same compiled chunk, one member at a time from a Python loop."""
    config = config_for(w, members, "fp32")
    table = MemberTable.from_config(config, config.folds)
    total = 0.0
    for i in range(members):
        one = run_ensemble(w, data, 1, "fp32", member_table=table.take([i]))
        total += one["chunk_s"]
    return {"members": members, "member_epochs_per_s": members * w["epochs"] / total}


def torch_baselines(w, members, deadline):
    """Plain PyTorch: a sequential loop over members, and a torch.func vmap ensemble."""
    try:
        import torch
        from torch.func import functional_call, grad, stack_module_state, vmap
    except ImportError:
        return {"skipped": "torch not importable"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    sizes = (w["features"], *w["hidden"], w["genes"])

    def make():
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
        return torch.nn.Sequential(*layers).to(device)

    x = torch.randn(w["rows"], w["features"], device=device)
    y = torch.randn(w["rows"], w["genes"], device=device)
    n_train = 491 if w["rows"] == 614 else int(w["rows"] * 0.8)
    steps = math.ceil(n_train / w["batch"])

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def sequential(n_members, epochs, autocast):
        model_times = 0.0
        for _ in range(n_members):
            model = make()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
            sync()
            start = time.perf_counter()
            for _ in range(epochs):
                perm = torch.randperm(n_train, device=device)
                for s in range(steps):
                    idx = perm[s * w["batch"]:(s + 1) * w["batch"]]
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                        loss = torch.nn.functional.mse_loss(model(x[idx]).float(), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                with torch.no_grad():
                    model(x[n_train:])
            sync()
            model_times += time.perf_counter() - start
        return n_members * epochs / model_times

    def vmapped(n_members, epochs):
        models = [make() for _ in range(n_members)]
        params, _ = stack_module_state(models)
        params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
        base = make().to("meta")
        opt = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=1e-4)

        def loss_fn(p, xb, yb):
            return torch.nn.functional.mse_loss(functional_call(base, p, (xb,)), yb)

        grads_fn = vmap(grad(loss_fn), in_dims=(0, 0, 0))
        sync()
        start = time.perf_counter()
        for _ in range(epochs):
            perms = torch.stack([torch.randperm(n_train, device=device) for _ in range(n_members)])
            for s in range(steps):
                idx = perms[:, s * w["batch"]:(s + 1) * w["batch"]]
                grads = grads_fn(params, x[idx], y[idx])
                norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
                scale = (1.0 / torch.clamp(norms, min=1.0)).view(-1)
                for k, p in params.items():
                    p.grad = grads[k] * scale.view(-1, *([1] * (grads[k].dim() - 1)))
                opt.step()
        sync()
        return n_members * epochs / (time.perf_counter() - start)

    out = {"device": device, "torch": torch.__version__}
    sequential(1, 1, False)  # warm-up (cuBLAS handles, allocator)
    out["torch_sequential_fp32"] = sequential(2, 2, False)
    if time.perf_counter() < deadline:
        out["torch_sequential_bf16_autocast"] = sequential(2, 2, True)
    if time.perf_counter() < deadline:
        vmapped(members, 1)
        out["torch_func_vmap_fp32"] = vmapped(members, 2)
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, marker in zip(VARIANTS, "osv^D"):
        rows = [r for r in results["sweep"] if r["variant"] == variant]
        if rows:
            left.plot([r["members"] for r in rows], [r["member_epochs_per_s"] for r in rows], marker=marker,
                      label=variant)
            left.plot([r["members"] for r in rows], [r["ceiling_member_epochs_per_s"] for r in rows], ls=":",
                      color=left.lines[-1].get_color(), label=f"{variant} memory roofline")
    left.set(xscale="log", xlabel="ensemble members", ylabel="member-epochs / s",
             title=f"scp-jax ensemble throughput ({results['device']})")
    left.legend(fontsize=7, ncol=2)
    bars = {f"scp-jax {r['variant']}": r["member_epochs_per_s"] for r in results["sweep"]
            if r["members"] == results["w20_members"]}
    bars["JAX sequential"] = results["baselines"].get("jax_sequential", {}).get("member_epochs_per_s", 0)
    for key in ("torch_sequential_fp32", "torch_sequential_bf16_autocast", "torch_func_vmap_fp32"):
        if key in results["baselines"].get("torch", {}):
            bars[key.replace("_", " ")] = results["baselines"]["torch"][key]
    right.barh(list(bars), list(bars.values()), color="tab:blue")
    for i, v in enumerate(bars.values()):
        right.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    right.set(xlabel="member-epochs / s", title=f"W{results['w20_members']}: engine vs baselines")
    fig.tight_layout()
    with_path = Path(path)
    fig.savefig(with_path.with_suffix(".tmp.png"), dpi=110)
    with_path.with_suffix(".tmp.png").replace(with_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, for a CPU")
    parser.add_argument("--sizes", default=None, help="ensemble sizes (default 1,5,20,50,100; quick 1,8)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="precisions, +lowrank for low-rank gradients")
    parser.add_argument("--tiles", default="16x64x4,16x128x4,32x128x8,64x64x8",
                        help="on one GPU, other tiles (rows x columns x warps) of the fused kernel to time at W20")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new measurements after this")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput-<device>.json)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    w = WORKLOADS["quick" if args.quick else "full"]
    sizes = [int(s) for s in (args.sizes or ("1,8" if args.quick else "1,5,20,50,100")).split(",")]
    w20 = 8 if args.quick else 20
    device = jax.devices()[0]
    kind = "gpu" if device.platform == "gpu" else device.platform
    out = Path(args.out or f"benchmarks/results/throughput-{kind}{'-quick' if args.quick else ''}.json")
    results = {"device": getattr(device, "device_kind", kind), "platform": device.platform,
               "jax": jax.__version__, "python": platform.python_version(), "workload": w,
               "params_per_member": n_params(w), "w20_members": w20, "sweep": [], "tiles": [], "aligned": [],
               "baselines": {},
               "accesses_per_step": ACCESSES_PER_STEP, "accesses_per_epoch": ACCESSES_PER_EPOCH}
    data = workload_data(w)
    results["bandwidth_bytes_per_s"] = bandwidth = measure_bandwidth(2**28 if args.quick else 2**30)
    print(f"{results['device']}: copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)

    def save():
        write_text(out, json.dumps(results, indent=2) + "\n")

    # W20 in every variant first, then the fused kernel at aligned rows, the size sweep of the
    # low-rank variants, other tiles of the kernel, the rest of the sweep: a short budget still
    # measures W20, and a kernel that brings the process down loses only what comes after it.
    variants = args.variants.split(",")
    lowrank_variants = [v for v in variants if v.endswith("+lowrank")]
    dense_swept = [v for v in ("fp32", "bf16_state") if v in variants]
    fused = lowrank.default_impl() == "pallas"
    tiles = [tuple(int(n) for n in t.split("x")) for t in args.tiles.split(",")] if fused else []
    # W20's 18,211 genes start most rows of the head's kernel off a 16-byte boundary, where Triton
    # cannot vectorize the fused kernel's loads: on one GPU it is also timed with aligned rows.
    aligned = dict(w, genes=-(-w["genes"] // 8) * 8)
    aligned_data = functools.cache(lambda: workload_data(aligned))
    order = ([(w20, v, None, w) for v in variants] + [(w20, v, None, aligned) for v in lowrank_variants if fused and aligned != w]
             + [(m, v, None, w) for v in lowrank_variants for m in sizes if m != w20]
             + [(w20, v, t, w) for t in tiles for v in lowrank_variants]
             + [(m, v, None, w) for v in dense_swept for m in sizes if m != w20])
    for members, variant, tile, workload in order:
        entry = {"members": members, "variant": variant, "tile": tile, "genes": workload["genes"]}
        if time.perf_counter() > deadline:
            results.setdefault("skipped", []).append(entry)
            continue
        try:
            arrays = aligned_data() if workload is aligned else data
            r = dict(run_ensemble(workload, arrays, members, variant, tile=tile), genes=workload["genes"])
        except Exception as err:  # e.g. out of memory at the largest size, a kernel that fails: record it, go on
            results.setdefault("failed", []).append(dict(entry, error=str(err).splitlines()[0][:300]))
            continue
        r.update(roofline(workload, r, bandwidth))
        results["tiles" if tile else "aligned" if workload is aligned else "sweep"].append(r)
        note = f", tile {tile}" if tile else f", {aligned['genes']} genes" if workload is aligned else ""
        print(f"{members:4d} members {variant:18s} {r['member_epochs_per_s']:8.1f} member-epochs/s "
              f"({r['roofline_fraction']:.0%} of roofline {r['ceiling_member_epochs_per_s']:.0f}), "
              f"compile {r['compile_s']:.1f} s{note}", flush=True)
        save()
    results["sweep"].sort(key=lambda r: (r["variant"], r["members"]))
    if time.perf_counter() < deadline:
        results["baselines"]["jax_sequential"] = jax_sequential(w, data, w20 if args.quick else 5)
        print(f"JAX sequential {results['baselines']['jax_sequential']['member_epochs_per_s']:.1f} member-epochs/s",
              flush=True)
        save()
    if time.perf_counter() < deadline:
        results["baselines"]["torch"] = torch_baselines(w, w20, deadline)
        print(f"torch: {results['baselines']['torch']}", flush=True)
    results["wall_s"] = time.perf_counter() - start
    save()
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
