"""A preallocated key/value cache with a committed length per sequence.

Layout: one tensor ``[layers, 2, B, kv_heads, capacity, head_dim]`` (2 = keys, values). Row ``b`` holds its
committed tokens in slots ``[0, lengths[b])``. A forward writes its ``n`` new tokens to the scratch slots
``[lengths[b], lengths[b] + n)`` without changing ``lengths``; :meth:`commit` then keeps a chosen subset of
them (the accepted path) by moving their entries into place, so nothing is recomputed.

A batch that requests join and leave keeps its live sequences in the first rows: :meth:`rows` is a cache over a
range of rows that shares this one's storage and lengths, and :meth:`move_row` fills a freed row.

A cache for sparse attention (runtime/sparse_attention.py) also holds ``labels``: float64
``[layers, B, kv_heads, channels, capacity]``, a few channels of each key, which the attention writes and every
operation here keeps in step with the keys.
"""

from __future__ import annotations

import torch

from decodekit.errors import PromptTooLong

GROWTH = 256  # a cache sized on demand grows to whole multiples of this many slots per row


def rounded_capacity(slots: int) -> int:
    """``slots`` rounded up to a whole multiple of GROWTH."""
    return -(-slots // GROWTH) * GROWTH


class KVCache:
    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        label_channels: int = 0,
    ) -> None:
        """``label_channels``: the channels per key of a label cache (0: none)."""
        self.kv = torch.zeros(layers, 2, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.labels: torch.Tensor | None = None
        if label_channels:
            shape = (layers, batch, kv_heads, label_channels, capacity)
            self.labels = torch.zeros(shape, dtype=torch.float64, device=device)
        self._all_lengths = [0] * batch  # shared with every view from rows()
        self._first = 0

    @property
    def lengths(self) -> list[int]:
        """Committed tokens per row (a copy)."""
        return self._all_lengths[self._first : self._first + self.batch]

    @lengths.setter
    def lengths(self, lengths: list[int]) -> None:
        assert len(lengths) == self.batch
        self._all_lengths[self._first : self._first + self.batch] = lengths

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows ``[start, stop)`` sharing this cache's storage and lengths."""
        view = object.__new__(KVCache)
        view.kv = self.kv[:, :, start:stop]
        view.labels = None if self.labels is None else self.labels[:, start:stop]
        view._all_lengths, view._first = self._all_lengths, self._first + start
        return view

    def move_row(self, source: int, target: int) -> None:
        """Copy row ``source``'s committed entries into row ``target``, which takes its length."""
        length = self.lengths[source]
        self.kv[:, :, target, :, :length] = self.kv[:, :, source, :, :length]
        if self.labels is not None:
            self.labels[:, target, ..., :length] = self.labels[:, source, ..., :length]
        self._all_lengths[self._first + target] = length

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    def grow(self, capacity: int) -> None:
        """Make room for ``capacity`` slots per row, keeping every row's committed entries (on a whole cache,
        not on a view from :meth:`rows`)."""
        if capacity <= self.capacity:
            return
        kv = self.kv.new_zeros(*self.kv.shape[:4], capacity, self.kv.shape[5])
        width = max(self.lengths)
        kv[:, :, :, :, :width] = self.kv[:, :, :, :, :width]
        self.kv = kv
        if self.labels is not None:
            labels = self.labels.new_zeros(*self.labels.shape[:4], capacity)
            labels[..., :width] = self.labels[..., :width]
            self.labels = labels

    def reset(self) -> None:
        self.lengths = [0] * self.batch

    def check_room(self, n: int) -> None:
        """Raise PromptTooLong unless every row has ``n`` free scratch slots."""
        if max(self.lengths) + n > self.capacity:
            raise PromptTooLong(f"sequence would need {max(self.lengths) + n} cache slots, capacity is {self.capacity}")

    def write(self, layer: int, entries: torch.Tensor) -> None:
        """Store new keys and values ``entries [2, B, kv_heads, n, head_dim]`` in each row's scratch slots."""
        n = entries.shape[3]
        for b, length in enumerate(self.lengths):
            self.kv[layer, :, b, :, length : length + n] = entries[:, b]

    def layer(self, layer: int) -> torch.Tensor:
        """The storage of one layer, ``[2, B, kv_heads, capacity, head_dim]``, for a kernel that writes and reads it
        as :meth:`write` and :meth:`view` do (runtime/kernels/block.cpp)."""
        return self.kv[layer]

    def view(self, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``width`` slots: two ``[B, kv_heads, width, head_dim]`` views."""
        return self.kv[layer, 0, :, :, :width], self.kv[layer, 1, :, :, :width]

    def write_labels(self, layer: int, labels: torch.Tensor) -> None:
        """Store the labels ``[B, kv_heads, channels, n]`` of the keys :meth:`write` stored."""
        n = labels.shape[3]
        for b, length in enumerate(self.lengths):
            self.labels[layer, b, :, :, length : length + n] = labels[b]

    def commit_all(self, n: int) -> None:
        """Keep the first ``n`` scratch slots of every row."""
        self._all_lengths[self._first : self._first + self.batch] = [length + n for length in self.lengths]

    def commit(self, row: int, kept: torch.Tensor | int) -> None:
        """Append scratch entries to row ``row``'s committed prefix.

        ``kept``: either a count ``m`` (keep the first m scratch slots, as after a prefill or a chain), or
        int64 ``[m]`` increasing scratch indices (the accepted path of a tree, root first), moved to
        ``[length, length + m)`` for every layer at once.
        """
        length = self.lengths[row]
        if isinstance(kept, int):
            self._all_lengths[self._first + row] = length + kept
            return
        m = kept.numel()
        if not bool((kept == torch.arange(m, device=kept.device)).all()):
            entries = self.kv[:, :, row]
            kept = length + kept.to(self.kv.device)
            entries[:, :, :, length : length + m] = entries.index_select(3, kept)
            if self.labels is not None:
                labels = self.labels[:, row]
                labels[..., length : length + m] = labels.index_select(3, kept)
        self._all_lengths[self._first + row] = length + m
