"""Resumable prompt order and the dynamic-sampling surplus buffer.

:class:`PromptSampler` serves fixed-size batches of prompt indices in a seeded order that is
reshuffled each epoch (epoch ``e`` uses the permutation seeded by ``(seed, e)``, so it does not
depend on how many batches were drawn before). Its ``state_dict()`` is the data position saved
in a checkpoint; after ``load_state_dict()`` the following batches are exactly those an
uninterrupted run would have drawn.

:class:`GroupBuffer` holds what dynamic sampling kept beyond a full batch: a rollout step takes
``train_batch_size`` groups out and the surplus waits, in order, for the next step. Its state
(the held groups themselves) goes into the checkpoint too, so a resumed run sees the same
groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


class PromptSampler:
    """Seeded, epoch-aware order over ``num_prompts`` prompts, in batches of ``batch_size``."""

    def __init__(
        self,
        num_prompts: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 1,
        drop_last: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and batch_size > num_prompts:
            raise ValueError(
                f"batch_size ({batch_size}) is larger than the dataset ({num_prompts} prompts) "
                "and drop_last is set: no batch could ever be drawn"
            )
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.num_prompts, self.batch_size = num_prompts, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_epochs = num_epochs
        self.epoch = 0
        """Current epoch (0-based)."""
        self.batches_in_epoch = 0
        """Batches already drawn from the current epoch."""
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_prompts, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def exhausted(self) -> bool:
        """True once ``num_epochs`` epochs have been drawn completely."""
        return self.num_epochs is not None and self._next_position()[0] >= self.num_epochs

    def order(self, epoch: int) -> np.ndarray:
        """Prompt indices of ``epoch`` in the order they are served, shape [num_prompts]."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
            else:
                perm = np.arange(self.num_prompts)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def _next_position(self) -> tuple[int, int]:
        if self.batches_in_epoch >= self.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batches_in_epoch

    def next_batch(self) -> list[int]:
        """The next batch of prompt indices; raises StopIteration after ``num_epochs`` epochs."""
        if self.exhausted:
            raise StopIteration(f"all {self.num_epochs} epochs of prompts were drawn")
        self.epoch, position = self._next_position()
        start = position * self.batch_size
        batch = self.order(self.epoch)[start : start + self.batch_size]
        self.batches_in_epoch = position + 1
        return [int(i) for i in batch]

    def state_dict(self) -> dict[str, Any]:
        """Data position plus the settings it is only meaningful under."""
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "num_prompts": self.num_prompts,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved under a different dataset or batching."""
        for key in ("num_prompts", "batch_size", "shuffle", "seed", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"cannot resume the prompt order: checkpoint has {key}={state.get(key)!r}, "
                    f"this run has {getattr(self, key)!r} (did the data files or data.* change?)"
                )
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])


class PromptDataLoader(Generic[T]):
    """Batches of items (e.g. tokenized prompts) drawn through a :class:`PromptSampler`."""

    def __init__(self, items: Sequence[T], batch_size: int, **sampler_kwargs: Any) -> None:
        self.items = items
        self.sampler = PromptSampler(len(items), batch_size, **sampler_kwargs)

    def next_batch(self) -> list[T]:
        """The next ``batch_size`` items (fewer only for an epoch's tail without drop_last)."""
        return [self.items[i] for i in self.sampler.next_batch()]

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class GroupBuffer(Generic[T]):
    """FIFO of kept response groups: the dynamic-sampling surplus carried to the next step."""

    def __init__(self) -> None:
        self._groups: list[T] = []

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, groups: Iterable[T]) -> None:
        """Append groups that passed the filter, in generation order."""
        self._groups.extend(groups)

    def has(self, num_groups: int) -> bool:
        return len(self._groups) >= num_groups

    def take(self, num_groups: int) -> list[T]:
        """Remove and return the oldest ``num_groups`` groups; the rest stay for later steps."""
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if len(self._groups) < num_groups:
            raise ValueError(f"buffer holds {len(self._groups)} groups, {num_groups} requested")
        taken, self._groups = self._groups[:num_groups], self._groups[num_groups:]
        return taken

    def state_dict(self) -> dict[str, Any]:
        """The held groups themselves (they must be picklable to go into a checkpoint)."""
        return {"groups": list(self._groups)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._groups = list(state["groups"])
