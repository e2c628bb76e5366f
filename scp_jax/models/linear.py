"""nnx.Linear whose kernel gradient the engine can take as its two factors.

For y = x @ W + b on B rows, dL/dW = x^T dy. While a `Tape` is recording, a `Linear` keeps its input
x and adds a zero probe to its output y, so the gradient with respect to the probe is dy. The
engine then never has to hold dW itself (engine/lowrank.py says why that pays). Outside a tape it
is nnx.Linear, parameters and all.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

_TAPE = contextvars.ContextVar("scp_jax_tape", default=None)


class Linear(nnx.Linear):
    def __call__(self, inputs, out_sharding=None):
        y = super().__call__(inputs, out_sharding)
        tape = _TAPE.get()
        return y if tape is None else tape.record(self.kernel.get_value(), inputs, y)


class Tape:
    """The inputs and output probes of the `Linear` layers that one call of a model runs.

    Records are keyed by the kernel's path in `params`, the parameter state the model was merged
    from. `probes` (path -> zeros like the layer's output) are added to the outputs; without them
    (to learn their shapes) zeros are.
    """

    def __init__(self, params, probes=None):
        self._paths = {id(leaf): jax.tree_util.keystr(path)
                       for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        self._probes = probes
        self.inputs, self.outputs = {}, {}

    def record(self, kernel, inputs, outputs):
        path = self._paths.get(id(kernel))
        if path is None or path in self.inputs:
            raise ValueError("Tape: a Linear's kernel is not a leaf of the taped params, or the layer ran twice")
        self.inputs[path], self.outputs[path] = inputs, outputs
        return outputs + (jnp.zeros_like(outputs) if self._probes is None else self._probes[path])


@contextlib.contextmanager
def recording(tape):
    token = _TAPE.set(tape)
    try:
        yield tape
    finally:
        _TAPE.reset(token)
