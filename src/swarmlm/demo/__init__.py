"""`swarmlm demo`: the main job, end to end on one machine.

- local.py: `run_demo` — tokenizer + tiny model trained on the embedded corpus (the Python
  standard library), a generated sample, and a summary.
"""

from swarmlm.demo.local import run_demo

__all__ = ["run_demo"]
