"""Deterministic, resumable RL prompt batches: `prompts_per_step` prompts x `group_size` samples.

Each epoch is a permutation of the dataset drawn from (seed, epoch), so a run's prompt order is
a pure function of the seed, and a checkpoint needs only (epoch, cursor, step) to resume exactly.
A batch that runs past the end of an epoch continues into the next epoch's permutation; no
prompt is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from erpo_mega.data.types import PromptItem


@dataclass(frozen=True)
class PromptBatch:
    """One RL step's prompts; every prompt is to be sampled `group_size` times."""

    items: list[PromptItem]
    indices: list[int]  # positions in the dataset
    group_size: int
    step: int
    epoch: int  # epoch of the batch's first prompt

    def expanded(self) -> list[tuple[int, PromptItem]]:
        """(group id, item) for all n x G samples, group-major (the G samples of a prompt are adjacent)."""
        return [(g, item) for g, item in enumerate(self.items) for _ in range(self.group_size)]


def dataset_fingerprint(items: list[PromptItem]) -> str:
    """Hash of the prompts and answers, to refuse resuming on a different dataset."""
    h = hashlib.blake2b(digest_size=8)
    for it in items:
        h.update(repr((it.prompt, it.answer)).encode())
    return h.hexdigest()


class PromptBatcher:
    def __init__(self, items: list[PromptItem], prompts_per_step: int, group_size: int, seed: int = 0,
                 shuffle: bool = True):
        if not items:
            raise ValueError("PromptBatcher needs at least one prompt")
        if prompts_per_step < 1 or group_size < 1:
            raise ValueError(f"prompts_per_step and group_size must be >= 1, got {prompts_per_step}, {group_size}")
        self.items = items
        self.prompts_per_step = prompts_per_step
        self.group_size = group_size
        self.seed = seed
        self.shuffle = shuffle
        self.fingerprint = dataset_fingerprint(items)
        self.epoch = 0
        self.cursor = 0
        self.step = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def next_batch(self) -> PromptBatch:
        first_epoch = self.epoch
        indices: list[int] = []
        while len(indices) < self.prompts_per_step:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            take = min(self.prompts_per_step - len(indices), len(self._order) - self.cursor)
            indices += [int(i) for i in self._order[self.cursor : self.cursor + take]]
            self.cursor += take
        batch = PromptBatch([self.items[i] for i in indices], indices, self.group_size, self.step, first_epoch)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[PromptBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Plain data for the trainer checkpoint."""
        return {"epoch": self.epoch, "cursor": self.cursor, "step": self.step, "seed": self.seed,
                "shuffle": self.shuffle, "num_items": len(self.items), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` left off; refuses a state saved for another dataset, seed or order."""
        for key, mine in (("num_items", len(self.items)), ("fingerprint", self.fingerprint),
                          ("seed", self.seed), ("shuffle", self.shuffle)):
            if key not in state:
                raise ValueError(f"batcher state is missing '{key}'")
            if state[key] != mine:
                raise ValueError(f"batcher state '{key}' is {state[key]!r} but this run has {mine!r}: "
                                 "the dataset or data seed changed since the checkpoint")
        epoch, cursor, step = int(state["epoch"]), int(state["cursor"]), int(state["step"])
        if epoch < 0 or step < 0 or not 0 <= cursor <= len(self.items):
            raise ValueError(f"batcher state out of range: epoch={epoch} cursor={cursor} step={step}")
        self.epoch, self.cursor, self.step = epoch, cursor, step
        self._order = self._permutation(epoch)
