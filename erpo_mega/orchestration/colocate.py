"""Colocated placement: engines and trainer take turns with the same accelerator memory.

When the engines run on the training GPUs, neither side can keep its memory while the
other works. Per RL step the order is (as in the SGLang-based RL stacks):

    rollout      engines hold weights + KV cache; trainer params/grads/optimizer offloaded
    for_training engines release everything (no generation possible), trainer onloads
    logprob, train
    for_sync     trainer offloads grads + optimizer (keeps params to export), engines get
                 their weights memory back, the weights are pushed
    after_sync   trainer offloads params, engines get KV cache (and CUDA graphs) back

Only rank 0 talks to the engines; every rank offloads its own state. The other ranks wait
for rank 0's HTTP calls on the CPU wait group. `events` records the order (for tests).
"""

from __future__ import annotations

from contextlib import contextmanager

from erpo_mega.parallel.dist import wait_for_rank0

WEIGHTS = ["weights"]
CACHES = ["kv_cache", "cuda_graph"]


class ColocationError(RuntimeError):
    """An engine refused to release or resume its memory."""


class ColocatedMemory:
    def __init__(self, worker, engines: list | None, enabled: bool = True):
        self.worker = worker
        self.engines = engines or []  # SGLangClient per engine (rank 0); empty elsewhere
        self.enabled = enabled
        self.events: list[str] = []
        self.engines_released = False

    def _engines(self, op: str, tags: list[str] | None) -> None:
        for i, e in enumerate(self.engines):
            fn = e.release_memory_occupation if op == "release" else e.resume_memory_occupation
            try:
                fn(tags)
            except Exception as ex:  # name the engine and the operation
                raise ColocationError(f"engine {i}: {op}_memory_occupation({tags}) failed: {ex}") from ex
        self.events.append(f"engines.{op}({','.join(tags) if tags else 'all'})")

    def start(self) -> None:
        """Engines are up with the current weights: move the trainer out of their way."""
        if not self.enabled:
            return
        self.worker.offload()
        self.events.append("trainer.offload(all)")
        wait_for_rank0()

    @contextmanager
    def trainer_resident(self):
        """The trainer's full state between steps (checkpoint save, final export): the
        engines give up their caches meanwhile and get them back afterwards."""
        if not self.enabled or not self.worker.offloaded:
            yield
            return
        self._engines("release", CACHES)
        wait_for_rank0()
        self.worker.onload()
        self.events.append("trainer.onload")
        try:
            yield
        finally:
            self.worker.offload()
            self.events.append("trainer.offload(all)")
            wait_for_rank0()
            self._engines("resume", CACHES)

    def for_training(self) -> None:
        """After the rollout: engines give up all memory, the trainer comes back."""
        if not self.enabled:
            return
        self._engines("release", None)
        self.engines_released = True
        wait_for_rank0()
        self.worker.onload()
        self.events.append("trainer.onload")

    def for_sync(self) -> None:
        """After the update: keep only the parameters, give the engines their weights memory."""
        if not self.enabled:
            return
        self.worker.offload(params=False, grads=True, optimizer=True)
        self.events.append("trainer.offload(grads,optimizer)")
        wait_for_rank0()
        self._engines("resume", WEIGHTS)

    def after_sync(self) -> None:
        """Weights are in the engines: free the trainer's params, give the engines their caches."""
        if not self.enabled:
            return
        self.worker.offload(params=True, grads=True, optimizer=True)
        self.events.append("trainer.offload(params)")
        wait_for_rank0()
        self._engines("resume", CACHES)
        self.engines_released = False
