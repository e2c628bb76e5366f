"""`python -m scp_jax.train` that stalls once the checkpoint of epoch $SCP_JAX_TEST_STALL_AFTER_EPOCH is
on disk: it prints "stalled after epoch N" and sleeps, so a test can kill or signal a run mid-training.

    python -m stalled_train ARGS   (with tests/ on PYTHONPATH)
"""

import os
import signal
import sys
import time

from scp_jax import train
from scp_jax.engine.checkpoint import Checkpointer

STALL_ENV = "SCP_JAX_TEST_STALL_AFTER_EPOCH"


def save_then_stall(save):
    def wrapper(self, epoch, *args, **kwargs):
        save(self, epoch, *args, **kwargs)
        if os.environ.get(STALL_ENV) == str(epoch):
            self.manager.wait_until_finished()
            print(f"stalled after epoch {epoch}", flush=True)
            time.sleep(600)

    return wrapper


if __name__ == "__main__":
    # Ctrl-C as from a terminal, even when the tests run where SIGINT is ignored (nohup, a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    Checkpointer.save = save_then_stall(Checkpointer.save)
    train.main(sys.argv[1:])
