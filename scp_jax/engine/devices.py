"""Placing the member axis on devices: members are sharded over every device (axis `members`),
shared data is replicated. Members never talk to each other, so no step needs communication.

Works across hosts too: arrays are built from host data with `make_array_from_callback` (each
process fills only its own shards) and read back with `process_allgather`.
"""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scp_jax.errors import UserError


def initialize_distributed(enabled):
    """Join a multi-host run: `distributed = true`, or SCP_JAX_DISTRIBUTED=1 in the environment.

    Coordinator address, process count and id come from the cluster (SLURM, Open MPI, ...) as
    `jax.distributed.initialize` detects them, or, where it cannot (a single machine, a plain
    cluster), from JAX_COORDINATOR_ADDRESS, SCP_JAX_NUM_PROCESSES and SCP_JAX_PROCESS_ID.
    """
    if not (enabled or os.environ.get("SCP_JAX_DISTRIBUTED") == "1"):
        return
    explicit = {}
    if "SCP_JAX_NUM_PROCESSES" in os.environ or "SCP_JAX_PROCESS_ID" in os.environ:
        try:
            explicit = {"num_processes": int(os.environ["SCP_JAX_NUM_PROCESSES"]),
                        "process_id": int(os.environ["SCP_JAX_PROCESS_ID"])}
        except (KeyError, ValueError):
            raise UserError("SCP_JAX_NUM_PROCESSES and SCP_JAX_PROCESS_ID must both be set to integers") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need it; GPUs ignore it
    try:
        jax.distributed.initialize(**explicit)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"jax.distributed.initialize failed: {str(err).splitlines()[0]}") from None


class MemberPlacement:
    def __init__(self, devices=None):
        self.devices = list(devices or jax.devices())
        self.mesh = Mesh(np.array(self.devices), ("members",))
        self.members = NamedSharding(self.mesh, PartitionSpec("members"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    def padded(self, n_members):
        """Member count rounded up to fill every device equally."""
        return -(-n_members // len(self.devices)) * len(self.devices)

    @staticmethod
    def _put(tree, sharding):
        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, tree)

    def shard(self, tree):
        return self._put(tree, self.members)

    def replicate(self, tree):
        return self._put(tree, self.replicated)


def broadcast_text(text, size=4096):
    """Process 0's `text` on every process (a run dir name chosen there, say); itself when alone."""
    if jax.process_count() == 1:
        return text
    data = np.zeros(size, np.uint8)
    encoded = text.encode()[:size]
    data[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(data))).rstrip(b"\0").decode()


def to_host(tree):
    """Device arrays (possibly spread over hosts) as numpy arrays."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, tree)
