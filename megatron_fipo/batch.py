"""The unit of work the loop hands to the training ranks: one rollout batch (torch only).

The driver builds one :class:`ActorBatch` per step and hands it over once (a Ray object ref);
the training ranks cut it themselves (:meth:`ActorBatch.select`): their data-parallel share
of each mini-batch (:func:`balanced_partition`), old log-probs on those rows, the optimizer
steps. Nothing travels back but metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(kw_only=True)
class ActorBatch:
    """Sequences of one rollout step (or a selection of them).

    ``input_ids``: B 1-D tensors, prompt followed by response; ``prompt_lengths`` /
    ``response_lengths``: ``[B]``; ``advantages``: ``[B]`` or ``[B, T_resp]``;
    ``old_log_probs``: ``[B, T_resp]`` (set by the actor before the updates);
    ``rollout_log_probs``: ``[B, T_resp]``, the engine's log-probs of the sampled tokens (only
    compared with the actor's, as a health metric); ``fresh``: ``[B]`` bool, the row was sampled
    with the weights the actor holds now (False: dynamic-sampling surplus carried over from an
    earlier step, one version old, so its engine log-probs are not comparable). ``T_resp`` >=
    the longest response.
    ``loss_config``: a ``PolicyLossConfig`` overriding the actor's (tests).
    """

    input_ids: list[torch.Tensor]
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    advantages: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None
    fresh: torch.Tensor | None = None
    loss_config: Any = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows: Sequence[int] | torch.Tensor) -> ActorBatch:
        """The batch of ``rows`` (in that order); per-token columns are cut to the longest
        response among them."""
        index = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        responses = self.response_lengths[index]
        width = int(responses.max()) if len(index) else 0

        def cut(value: torch.Tensor | None) -> torch.Tensor | None:
            if value is None:
                return None
            value = value[index]
            return value[:, :width] if value.dim() == 2 else value

        return replace(
            self,
            input_ids=[self.input_ids[int(i)] for i in index],
            prompt_lengths=self.prompt_lengths[index],
            response_lengths=responses,
            advantages=cut(self.advantages),
            old_log_probs=cut(self.old_log_probs),
            rollout_log_probs=cut(self.rollout_log_probs),
            fresh=cut(self.fresh),
        )

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` tokens of each sequence (prompt + response)."""
        return self.prompt_lengths + self.response_lengths


def balanced_partition(lengths: Sequence[int] | torch.Tensor, num_parts: int) -> list[list[int]]:
    """Rows split into ``num_parts`` parts of about equal token count: longest first, each to
    the part with the fewest tokens so far (ties: the lower part). Deterministic; each part
    lists its rows in ascending order. With at least ``num_parts`` rows no part is empty."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    sizes = [int(n) for n in torch.as_tensor(lengths).reshape(-1).tolist()]
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    loads = [0] * num_parts
    for row in sorted(range(len(sizes)), key=lambda r: (-sizes[r], r)):
        target = min(range(num_parts), key=lambda p: (loads[p], len(parts[p]), p))
        parts[target].append(row)
        loads[target] += sizes[row]
    return [sorted(part) for part in parts]
