"""Padding of per-user sequences into fixed-width tensors, shared by training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from data.schema import PAD_INDEX


def left_pad(
    sequences: Sequence[Sequence[float]],
    length: int,
    *,
    pad_value: float = PAD_INDEX,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Stack sequences into a ``[len(sequences), length]`` tensor, right-aligned.

    Each sequence keeps its ``length`` most recent (last) values and is padded on the left with
    ``pad_value``, so the newest value is always in the last column whatever the history length.
    """
    padded = torch.full((len(sequences), length), pad_value, dtype=dtype)
    for row, sequence in enumerate(sequences):
        recent = sequence[len(sequence) - length :] if len(sequence) > length else sequence
        if len(recent):
            padded[row, length - len(recent) :] = torch.as_tensor(recent, dtype=dtype)
    return padded
