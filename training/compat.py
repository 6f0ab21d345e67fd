"""The one place MMM reaches past a public API of a library it builds on, each with a test
(tests/test_train_loop.py::test_compat_*) that fails loudly when the upstream code changes.

* DeepSpeed's CPU communication backend (``deepspeed/comm/torch.py``, ``TorchBackend.__init__``)
  JIT-builds its ``shm_comm`` op whenever it initialises: 85 s on a fresh environment, then ~1 s of
  compiler probes per worker start. Only DeepSpeed's *inference* all-reduce uses that op; training
  collectives go through torch.distributed (gloo), and the backend falls back to it when the
  builder returns None. DeepSpeed offers no switch for this (its ``DS_BUILD_SHM_COMM=0`` only
  governs ahead-of-time builds), so CPU training replaces the module-level builder. Upstream:
  deepspeedai/DeepSpeed, ``deepspeed/comm/torch.py::build_shm_op`` (no issue tracks an opt-out).
"""

from __future__ import annotations

import importlib

SHM_MODULE = "deepspeed.comm.torch"
SHM_BUILDER = "build_shm_op"


def skip_shm_comm_build() -> None:
    """CPU workers: DeepSpeed's backend gets no shm op and uses torch.distributed for everything."""
    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports torch itself under
    # that attribute name, so the import statement would hand back (and patch) the torch package.
    module = importlib.import_module(SHM_MODULE)
    if not callable(getattr(module, SHM_BUILDER, None)):
        raise RuntimeError(f"{SHM_MODULE}.{SHM_BUILDER} is gone: DeepSpeed changed how it builds its CPU shm op; "
                           "revisit training/compat.py")
    setattr(module, SHM_BUILDER, lambda: None)

