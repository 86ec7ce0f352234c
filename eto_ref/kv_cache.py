"""The KV cache of generation: every layer's keys and values, preallocated, one length per row.

Used by the sampler (eto_ref/sampler.py): a forward of new tokens with a cache
attends to everything the row holds, then appends the new tokens' keys/values.
See `KVCache` for the layout and what makes rows independent.
"""

from __future__ import annotations

import torch

from eto_ref.model import ModelConfig, SharedPrefixKV


class KVCache:
    """Keys and values of every layer, preallocated (B, nkv, S_cap, hs) per layer, written at per-row positions.

    Row b holds its first `lengths[b]` tokens in slots 0 .. lengths[b]-1: a token's
    slot is its position (and its RoPE position). A forward of T new tokens per row,
    right-padded (row b has n_b real ones first), writes row b's real tokens at the
    next n_b slots, and query t of row b sees the slots <= lengths[b] + t. So rows are
    independent (gpt-fast's `input_pos`, one per row): a row can be reset to a new
    conversation, rewound, or handed the keys/values of a shared prefix while the
    other rows go on (continuous batching). Padding is never written.

    The capacity S_cap grows by need (doubling, up to `max_len`), so a batch pays
    for the tokens it holds, not for the longest conversation imaginable.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, capacity: int = 256,
                 device=None, dtype: torch.dtype = torch.float32):
        self.shape = (config.num_key_value_heads, config.head_dim)
        self.layers, self.max_len, self.device, self.dtype = config.num_hidden_layers, max_len, device, dtype
        self.capacity = min(capacity, max_len)
        self.k = [self._empty(batch_size, self.capacity) for _ in range(self.layers)]
        self.v = [self._empty(batch_size, self.capacity) for _ in range(self.layers)]
        self.lengths = [0] * batch_size  # tokens held per row
        self._write = None  # (cache rows, input rows, columns, slots) of the real new tokens of a forward
        self._rows: torch.Tensor | None = None  # the cache rows the next forward runs on (None: all)
        self._span = 1

    def _empty(self, batch_size: int, slots: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.shape[0], slots, self.shape[1], device=self.device, dtype=self.dtype)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def ensure_capacity(self, needed: int) -> None:
        """Grow every layer's buffers to hold `needed` slots (doubling); RuntimeError past max_len."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise RuntimeError(f"KV cache overflow: a row needs {needed} slots, more than max_len {self.max_len}; "
                               "create the cache with a larger max_len")
        new = min(self.max_len, max(needed, 2 * self.capacity))
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                buffers[i] = self._empty(self.batch_size, new)
                buffers[i][:, :, : self.capacity] = old
        self.capacity = new

    def select(self, rows: list[int] | None) -> None:
        """Make the next forward run on these cache rows only (its input has one row per entry; None: all).

        A few rows can then prefill their new tokens while the others wait, without
        padding every row of the batch to the longest input.
        """
        self._rows = None if rows is None else torch.tensor(rows, dtype=torch.long)

    def begin(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim slots for a forward of new tokens (b, T) (True = real, right-padded).

        Returns the new tokens' positions (b, T) and the attention mask (b, T, S) over
        the S slots in use, on the cache's device; remembers where `update` writes;
        counts the new tokens in. The bookkeeping runs on the host: pass `new_valid` on
        the CPU (the sampler builds it there), and a decode step reads nothing back from
        the GPU (one host-to-device copy of the write indices, no synchronisation).
        """
        new_valid = new_valid.cpu()  # a no-op for a host tensor
        b, T = new_valid.shape
        rows = torch.arange(self.batch_size) if self._rows is None else self._rows  # cache row of each input row
        if len(rows) != b:
            raise ValueError(f"KVCache: {b} input rows for {len(rows)} selected cache rows")
        counts = new_valid.sum(-1)  # (b,)
        columns = torch.arange(T)
        if not torch.equal(new_valid, columns[None, :] < counts[:, None]):
            raise ValueError("KVCache: new tokens must be right-padded (each row's real tokens first)")
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        before = lengths[rows]  # (b,)
        self.ensure_capacity(int((before + counts).max()))
        r, c = new_valid.nonzero(as_tuple=True)  # (n,) each: input row and column of every real new token
        device = self.k[0].device
        self._write = tuple(torch.stack([rows[r], r, c, before[r] + c]).to(device))  # cache rows, rows, cols, slots
        lengths[rows] = before + counts
        self.lengths = lengths.tolist()
        self._span = max(int((before + counts).max()), 1)  # S: slots the selected rows attend over
        positions = (before[:, None] + columns[None, :]).to(device)  # (b, T)
        mask = torch.arange(self._span, device=device)[None, None, :] <= positions[:, :, None]  # (b, T, S)
        return positions, mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys/values (b, nkv, T, hs) at the claimed slots; return the selected rows'
        keys/values (b, nkv, S, hs) (a copy when only some rows are selected)."""
        cache_rows, rows, cols, slots = self._write
        self.k[layer][cache_rows, :, slots] = k[rows, :, cols].to(self.dtype)
        self.v[layer][cache_rows, :, slots] = v[rows, :, cols].to(self.dtype)
        S = self._span
        if self._rows is None:
            return self.k[layer][:, :, :S], self.v[layer][:, :, :S]
        selected = self._rows.to(self.device)
        return self.k[layer][selected, :, :S], self.v[layer][selected, :, :S]

    def set_prefix(self, rows: list[int], prefix: "SharedPrefixKV") -> None:
        """Start `rows` as new conversations that begin with a prefix computed once (its keys/values copied in)."""
        P = prefix.length
        self.ensure_capacity(P)
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer in range(self.layers):
            self.k[layer][index, :, :P] = prefix.k[layer].to(self.dtype)  # (1, nkv, P, hs) broadcast to the rows
            self.v[layer][index, :, :P] = prefix.v[layer].to(self.dtype)
        for row in rows:
            self.lengths[row] = P

    def reset(self, rows: list[int]) -> None:
        """Empty `rows` (a new conversation starts there); their old slots are simply overwritten later."""
        for row in rows:
            self.lengths[row] = 0

    def rewind(self, row: int, n: int) -> None:
        """Take back the last n tokens of a row (they are never attended again, and overwritten next)."""
        if n > self.lengths[row]:
            raise ValueError(f"rewind: row {row} holds {self.lengths[row]} tokens, asked to take back {n}")
        self.lengths[row] -= n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the other rows of the batch for good (so they stop costing compute): keep `rows` (index tensor).

        Layer by layer: each old buffer is freed as its smaller copy replaces it, so the
        cache never holds more than one layer twice.
        """
        self._rows = None
        rows = rows.to(self.device)
        for buffers in (self.k, self.v):
            for i in range(self.layers):
                buffers[i] = buffers[i][rows]
        self.lengths = [self.lengths[i] for i in rows.tolist()]
