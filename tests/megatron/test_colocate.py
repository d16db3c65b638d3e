"""Colocated placement: the order of release/resume/offload calls, and no generation while
the engine's memory is released (issue 13, defect 8).

A real embedded engine (started with --enable-memory-saver) over HTTP; the trainer side is
a recording stand-in for PolicyWorker's offload/onload (PolicyWorker's own refusal to run
while offloaded is checked in test_init_weights' spawn).
"""

from __future__ import annotations

import pytest

from erpo_mega.orchestration.colocate import ColocatedMemory
from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.client import SGLangClient
from erpo_mega.rollout.launch import launch_embedded_server
from tests.models.tiny_hf import save_hf_model


class RecordingWorker:
    def __init__(self, log: list):
        self.log = log
        self.offloaded: set[str] = set()

    def offload(self, params=True, grads=True, optimizer=True):
        what = {k for k, on in (("params", params), ("grads", grads), ("optimizer", optimizer)) if on}
        self.offloaded |= what
        self.log.append(("offload", tuple(sorted(self.offloaded))))

    def onload(self):
        self.offloaded.clear()
        self.log.append(("onload",))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("colocate")
    model = save_hf_model("qwen2", d / "hf")
    port = free_port()
    h = launch_embedded_server(model, port=port, log_path=d / "engine.log", num_threads=1, timeout=120.0,
                               enable_memory_saver=True, extra_args=["--skip-tokenizer-init"])
    client = SGLangClient(h.url)
    yield client
    client.close()
    h.close()


def _can_generate(client) -> bool:
    try:
        out = client.generate([[5, 6, 7]], {"max_new_tokens": 2, "temperature": 0.0}, return_logprob=False)
        return len(out[0].output_ids) == 2
    except Exception:
        return False


def test_rl_step_order_and_no_generation_while_released(engine):
    log: list = []
    worker = RecordingWorker(log)
    co = ColocatedMemory(worker, [engine])
    co.start()
    assert worker.offloaded == {"params", "grads", "optimizer"}
    assert _can_generate(engine)  # rollout: engines hold everything
    co.for_training()
    assert not worker.offloaded and co.engines_released
    assert not _can_generate(engine)  # released: generation is refused, not served from freed memory
    co.for_sync()
    assert worker.offloaded == {"grads", "optimizer"}  # params stay for the export
    assert not _can_generate(engine)  # weights back, caches still released
    weights = engine.get_weights_by_name("model.norm.weight", truncate_size=3)
    assert len(weights) == 3  # the push has somewhere to go
    co.after_sync()
    assert worker.offloaded == {"params", "grads", "optimizer"}
    assert _can_generate(engine)
    assert co.events == ["trainer.offload(all)", "engines.release(all)", "trainer.onload",
                         "trainer.offload(grads,optimizer)", "engines.resume(weights)",
                         "trainer.offload(params)", "engines.resume(kv_cache,cuda_graph)"]


def test_trainer_resident_releases_caches_for_a_save_and_restores(engine):
    worker = RecordingWorker([])
    co = ColocatedMemory(worker, [engine])
    co.start()
    with co.trainer_resident():
        assert not worker.offloaded
        assert not _can_generate(engine)
    assert worker.offloaded == {"params", "grads", "optimizer"}
    assert _can_generate(engine)


def test_disabled_colocation_does_nothing(engine):
    worker = RecordingWorker([])
    co = ColocatedMemory(worker, [engine], enabled=False)
    co.start()
    co.for_training()
    co.for_sync()
    co.after_sync()
    assert co.events == [] and not worker.offloaded and _can_generate(engine)
