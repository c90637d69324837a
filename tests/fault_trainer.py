"""A trainer process for the fault-injection test: trains a pickled TrainConfig and SIGKILLs itself at one moment.

    python -m tests.fault_trainer CONFIG.pkl [KIND STEP]

KIND is where the kill lands: `step` (before step STEP computes), `logged` (after step STEP's metrics record is
written, before its checkpoint), `save` (inside the asynchronous save of step STEP: grain's iterator item is
written in orbax's background thread, beside the state arrays, while the training thread goes on).
Without KIND the run goes to its end. The kill is SIGKILL: no cleanup, no atexit, as a pre-empted job.
"""

import os
import pickle
import signal
import sys


def main(argv):
  with open(argv[0], "rb") as f:
    cfg = pickle.load(f)
  kind, at = (argv[1], int(argv[2])) if len(argv) > 2 else (None, None)
  import jax
  from train import loop, metrics

  def die():
    os.kill(os.getpid(), signal.SIGKILL)

  if kind == "step":
    real_step = loop.make_train_step

    def counting_train_step(*a, **kw):
      fn = real_step(*a, **kw)

      def run(state, batch):
        if int(state["step"]) + 1 == at:
          die()
        return fn(state, batch)
      return run
    loop.make_train_step = counting_train_step
  elif kind == "logged":
    real_write = metrics.MetricsLog.write

    def write(self, record):
      real_write(self, record)
      if record.get("step") == at and "loss" in record:
        die()
    metrics.MetricsLog.write = write
  elif kind == "save":
    from grain._src.python.checkpoint import handler
    real_save = handler.CheckpointHandler.save

    def save(self, directory, *a, **kw):
      if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(at):
        die()
      return real_save(self, directory, *a, **kw)
    handler.CheckpointHandler.save = save
  loop.run(cfg, devices=jax.devices()[:1])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
