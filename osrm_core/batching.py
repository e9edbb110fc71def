"""Tokenization into padded batches (dynamic padding: each batch is padded to its longest row)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from osrm_core.data import Split
from osrm_core.errors import OsrmInputError


def iter_batches(
    tokenizer,
    split: Split,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    indices: Sequence[int] | None = None,
    with_labels: bool = True,
    sort_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches of ``input_ids``, ``attention_mask`` (and ``token_type_ids``, ``labels``).

    Parameters
    ----------
    indices : sequence of int, optional
        Which examples, in this order (default all, in order).
    sort_by_length : bool
        Group examples of similar length to cut padding (for evaluation; the order of results
        is then that of the sorted indices, see :func:`length_order`).
    """
    if batch_size < 1:
        raise OsrmInputError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise OsrmInputError(f"max_length must be >= 2, got {max_length}")
    idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
    if sort_by_length:
        idx = idx[length_order(tokenizer, split, idx, max_length)]
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        texts = [split.text[i] for i in chunk]
        pairs = None if split.text_pair is None else [split.text_pair[i] for i in chunk]
        enc = tokenizer(
            texts,
            pairs,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = dict(enc)
        if with_labels:
            batch["labels"] = torch.as_tensor(split.label[chunk], dtype=torch.long)
        yield batch


def length_order(tokenizer, split: Split, indices: np.ndarray, max_length: int) -> np.ndarray:
    """Positions into ``indices`` that sort the examples by tokenized length (stable)."""
    texts = [split.text[i] for i in indices]
    pairs = None if split.text_pair is None else [split.text_pair[i] for i in indices]
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    return np.argsort(lengths, kind="stable")


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
