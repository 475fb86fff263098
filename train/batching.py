"""Padding of item-index sequences into fixed-width tensors, shared by training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from data.schema import PAD_INDEX


def left_pad(sequences: Sequence[Sequence[int]], length: int) -> torch.LongTensor:
    """Stack sequences into a ``[len(sequences), length]`` tensor, right-aligned.

    Each sequence keeps its ``length`` most recent (last) items and is padded on the left with
    ``PAD_INDEX``, so the newest item is always in the last column whatever the history length.
    """
    padded = torch.full((len(sequences), length), PAD_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        recent = sequence[len(sequence) - length :] if len(sequence) > length else sequence
        if len(recent):
            padded[row, length - len(recent) :] = torch.as_tensor(recent, dtype=torch.long)
    return padded
