"""Dense kernels' gradients kept as their rank-B factors, so the optimizer step moves fewer bytes.

At batch 32 the ensemble's step is bound by memory traffic per parameter: the forward and the
backward read W, backprop writes dW, the clip norm reads it, and AdamW reads W, dW, mu, nu and
writes W, mu, nu: 11 accesses (benchmarks/throughput.py). But on B rows dW = x^T dy has rank at
most B, so
- its squared norm is sum((x x^T) * (dy dy^T)), from two [B, B] Gram matrices, and
- the update can form each tile of x^T dy where it reads that tile of W, mu and nu.
Then dW never goes through memory: 8 accesses. On one GPU a Pallas (Triton) kernel fuses the
product into AdamW; elsewhere XLA forms x^T dy first and runs the same update (engine/optim.py),
which still saves the norm's read.

Layers: `scp_jax.models.linear.Linear` whose batch has fewer rows than both sides of its kernel;
the fused kernel takes up to FUSED_ROWS of them. x is the layer's input as it arrives: with bf16
compute, autodiff would form dW from bf16(x), this from x itself.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from scp_jax.models.linear import Tape, recording
from scp_jax.precision import store

HIGHEST = jax.lax.Precision.HIGHEST
# A program's tile of W (rows, columns) and its warps: 2048 elements, 16 per thread and array, so
# the registers leave room for several programs per SM to keep loads in flight. Read when a program
# is traced; benchmarks/throughput.py --tiles times others (no GPU has run them yet).
TILE = (32, 64, 4)
FUSED_ROWS = 64  # more rows and the factors' tiles outgrow shared memory: XLA forms x^T dy instead


@dataclasses.dataclass(frozen=True)
class Factored:
    """A kernel's gradient x^T dy. Not a pytree node, so it is one leaf of the gradient tree."""

    x: jnp.ndarray  # [B, in]: the layer's inputs
    dy: jnp.ndarray  # [B, out]: the loss's gradient at its outputs

    def sq_norm(self):
        x, dy = self.x.astype(jnp.float32), self.dy.astype(jnp.float32)
        return jnp.sum(jnp.matmul(x, x.T, precision=HIGHEST) * jnp.matmul(dy, dy.T, precision=HIGHEST))

    def dense(self):
        return jnp.matmul(self.x.astype(jnp.float32).T, self.dy.astype(jnp.float32))


def default_impl():
    """How optim.step updates a Factored leaf: "pallas" (the fused kernel) on one GPU, else "xla"
    (dense first): on a CPU, with members sharded over devices (GSPMD partitioning would not split
    the kernel's custom call), and on a JAX without Pallas's Triton backend (deprecated in 0.11)."""
    if jax.default_backend() != "gpu" or jax.device_count() != 1:
        return "xla"
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return "xla"
    return "pallas"


def value_and_grad(loss_fn, params, *args):
    """`jax.value_and_grad(loss_fn)(params, *args)`, with the gradient of each taped Linear kernel
    as a Factored where that saves memory traffic. The kernels' own dense gradients are computed by
    nothing: no output uses them, so XLA drops them."""

    def taped(params, probes):
        with recording(Tape(params, probes)) as tape:
            loss = loss_fn(params, *args)
        return loss, (tape.inputs, tape.outputs)

    outputs = jax.eval_shape(taped, params, None)[1][1]
    probes = jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), outputs)
    (loss, (inputs, _)), (grads, dys) = jax.value_and_grad(taped, argnums=(0, 1), has_aux=True)(params, probes)

    def factor(path, grad):
        key = jax.tree_util.keystr(path)
        if key not in inputs:
            return grad
        x, dy = inputs[key], dys[key]
        x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        return Factored(x, dy) if x.shape[0] < min(grad.shape) else grad

    return loss, jax.tree_util.tree_map_with_path(factor, grads)


def fusable(grad):
    """Whether `fused_update` takes this gradient leaf: a Factored one of at most FUSED_ROWS rows."""
    return isinstance(grad, Factored) and grad.x.shape[0] <= FUSED_ROWS


def sq_norm(grad):
    return grad.sq_norm() if isinstance(grad, Factored) else jnp.sum(jnp.square(grad.astype(jnp.float32)))


def _pad(a, shape):
    return jnp.pad(a.astype(jnp.float32), [(0, n - m) for n, m in zip(shape, a.shape)])


def fused_update(update, p, m, v, grad, scalars, seed=None, interpret=False):
    """`update(p, g, m, v, *scalars)` -> (p, m, v) in float32, applied to every tile of a kernel with g
    = x^T dy formed in the tile, in one Pallas kernel that reads and writes p, m and v once (in
    place). `seed`: stochastic rounding of bf16 state (precision.stochastic_round_bf16). Pallas is
    imported here, so the package does not need its Triton backend unless this runs. Any member
    count fits: vmap folds the member into the pointer offsets, which Pallas makes 64-bit once the
    stacked array passes 4 GiB (tests/test_lowrank.py checks at 120 members of W20's head)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    n_in, n_out = p.shape
    block_in, block_out, warps = TILE
    # Zero padding: rows to a power of 2 >= 16 (what tl.dot takes), sides to whole tiles, so the
    # factors' loads stay in bounds; p, mu and nu's edge tiles are masked instead.
    rows = max(16, 1 << math.ceil(math.log2(grad.x.shape[0])))
    x_t = _pad(grad.x.T, (pl.cdiv(n_in, block_in) * block_in, rows))
    dy = _pad(grad.dy, (rows, pl.cdiv(n_out, block_out) * block_out))
    # Triton blocks have power-of-2 sizes: 8 scalar slots, 4 seeds (p, mu, nu and one unused).
    n_scalars = len(scalars)
    assert n_scalars <= 8, n_scalars
    scalars = jnp.stack([jnp.asarray(s, jnp.float32) for s in scalars] + [jnp.float32(0)] * (8 - n_scalars))
    seeds = jnp.zeros(4, jnp.uint32) if seed is None else seed + jnp.arange(4, dtype=jnp.uint32)

    def kernel(scalars_ref, seeds_ref, x_ref, dy_ref, p_ref, m_ref, v_ref, p_out, m_out, v_out):
        i, j = pl.program_id(0), pl.program_id(1)
        row = i * block_in + jnp.arange(block_in, dtype=jnp.int32)[:, None]
        col = j * block_out + jnp.arange(block_out, dtype=jnp.int32)[None, :]
        inside = (row < n_in) & (col < n_out)
        g = jnp.dot(x_ref[...], dy_ref[...], preferred_element_type=jnp.float32)  # as XLA would: TF32 on a GPU
        old = [plt.load(r, mask=inside, other=0.0).astype(jnp.float32) for r in (p_ref, m_ref, v_ref)]
        new = update(old[0], g, old[1], old[2], *(scalars_ref[k] for k in range(n_scalars)))
        index = (row * n_out + col).astype(jnp.uint32)
        for out, value, k in zip((p_out, m_out, v_out), new, range(3)):
            plt.store(out, store(value, p.dtype, None if seed is None else seeds_ref[k], index), mask=inside)

    block = pl.BlockSpec((block_in, block_out), lambda i, j: (i, j))
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)  # noqa: E731
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype)] * 3,
        grid=(pl.cdiv(n_in, block_in), pl.cdiv(n_out, block_out)),
        in_specs=[whole(scalars), whole(seeds), pl.BlockSpec((block_in, rows), lambda i, j: (i, 0)),
                  pl.BlockSpec((rows, block_out), lambda i, j: (0, j)), block, block, block],
        out_specs=[block] * 3,
        input_output_aliases={4: 0, 5: 1, 6: 2},
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(scalars, seeds, x_t, dy, p, m, v)
