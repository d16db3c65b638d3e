"""Name -> function registries, so YAML can select an advantage estimator or a policy loss.

A name is either one registered with the decorators below, or "package.module:function",
which is imported on demand so a user's plug-in needs no change to this package.

Uniform signatures (documented here because plug-ins must follow them):

    advantage estimator:
        fn(rewards[N], entropy[N, T] | None, response_mask[N, T], group_ids[N], cfg: ERPOConfig)
            -> (advantages[N, T], stats: dict[str, float | list[float]])
        Advantages are 0 on padding. `entropy` may be None for estimators that do not use it.

    policy loss:
        fn(logp, old_logp, advantages, mask, cfg: LossConfig, *, normalizer: LossNormalizer,
           ref_logp=None, rollout_logp=None, entropy=None) -> (loss: 0-dim tensor, metrics: dict)
        All tensors [B, T] for one micro-batch; the loss and every metric are this micro-batch's
        additive contribution to the whole step (see erpo_mega.algo.loss).
"""

from __future__ import annotations

from collections.abc import Callable

from erpo_mega.plugins import import_callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[Callable], Callable]:
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"{self.kind} name must be a non-empty string without ':', got {name!r}")

        def decorator(fn: Callable) -> Callable:
            if not callable(fn):
                raise TypeError(f"{self.kind} '{name}' must be callable, got {type(fn).__name__}")
            if name in self._items and self._items[name] is not fn and not overwrite:
                raise ValueError(f"{self.kind} '{name}' is already registered; pass overwrite=True to replace it")
            self._items[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if ":" in name:
            return self._import(name)
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())} "
                             "(or give 'package.module:function')")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def _import(self, spec: str) -> Callable:
        return import_callable(spec, self.kind)


ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")


def register_advantage_estimator(name: str, *, overwrite: bool = False):
    """Decorator: make `fn` selectable as `algo.advantage_estimator: <name>`."""
    return ADVANTAGE_ESTIMATORS.register(name, overwrite=overwrite)


def get_advantage_estimator(name: str) -> Callable:
    return ADVANTAGE_ESTIMATORS.get(name)


def register_policy_loss(name: str, *, overwrite: bool = False):
    """Decorator: make `fn` selectable as `algo.policy_loss: <name>`."""
    return POLICY_LOSSES.register(name, overwrite=overwrite)


def get_policy_loss(name: str) -> Callable:
    return POLICY_LOSSES.get(name)
