"""A failing push still closes every engine's session and resumes generation, and raises its own error."""

import pytest
import torch

from erpo_mega.rollout.client import WeightUpdateError
from erpo_mega.weights.transport import push_weights


class Engine:
    def __init__(self, fail_on: str | None = None):
        self.fail_on, self.calls, self.base_url = fail_on, [], "fake"

    def engine_tp_size(self):
        return 1

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            if name == self.fail_on:
                raise WeightUpdateError(self.base_url, f"{name} refused")
            return {"success": True}
        return call


@pytest.mark.parametrize("fail_on", ["update_weights_from_tensor", "begin_weight_update"])
def test_failed_push_cleans_up_everywhere(fail_on):
    engines = [Engine(), Engine(fail_on)]
    with pytest.raises(WeightUpdateError, match=f"{fail_on} refused"):
        push_weights([("w", torch.ones(3))], engines, method="tensor", weight_version="v1")
    for e in engines:
        assert e.calls[-1] == "continue_generation"              # generation resumed
        assert "update_weight_version" not in e.calls            # no version for a failed push
        opened = "begin_weight_update" in e.calls and not (e.fail_on == "begin_weight_update")
        assert ("end_weight_update" in e.calls) == opened        # every opened session closed


def test_pause_mode_none_leaves_generation_alone():
    e = Engine()
    push_weights([("w", torch.ones(3))], [e], method="tensor", weight_version="v", pause_mode=None)
    assert e.calls == ["begin_weight_update", "update_weights_from_tensor", "end_weight_update",
                       "update_weight_version", "flush_cache"]
    with pytest.raises(ValueError, match="pause_mode"):
        push_weights([("w", torch.ones(3))], [e], method="tensor", pause_mode="sleep")
