"""Sampling with a KV cache that lives across the turns of agent conversations.

Three layers, bottom-up:

1. `logits_to_probs` + `sample`: next-token choice from logits (greedy,
   temperature, top-k, top-p), reproducible with a seeded `torch.Generator`.
2. `Session`: a batch of conversations sharing one preallocated `KVCache`.
   `append` queues each row's new tokens (prompt, then observation + assistant
   header every turn); `generate` runs the queued tokens of all rows through the
   model in ONE padded forward (the prefill), then decodes one token per step
   for every running row until each row stops. The generated tokens stay in the
   cache, so the next turn only prefills the new observation instead of
   re-encoding the whole history.
3. `generate(model, prompts, ...)`: a one-shot helper (new session, append, generate).

What a row's conversation holds (`session.history(row)`): every appended token
and every *returned* generated token, in order. Most of it is in the cache; the
rest (the row's `pending` tokens: freshly appended ones and the last token of a
reply, which has been sampled but not fed yet) is fed by the next `generate`,
together with the next turn's tokens, so it never costs a forward of its own.

Stopping (per row; checked in this order after each new token):
    "eos"             the token is in `stop_ids`. The stop token is kept: it is the
                      last of `tokens` (the end of the assistant turn), not in `text`.
    "stop_string"     the decoded reply contains a stop string (e.g. "\\nObservation:").
                      `text` is cut where the stop string starts. `tokens` are the
                      generated tokens that lie wholly before that point; the slots
                      of the cut-off tokens are marked invalid in the cache, so they
                      are never attended again: the cache holds exactly `tokens`.
                      (When the stop string starts inside a token, that token is cut
                      too, and `text` is a few characters longer than decode(tokens).)
    "max_new_tokens"  the row reached `max_new_tokens` tokens; all are kept.
    "cache_full"      no free slot is left to feed the next token (all are kept), or
                      the queued tokens do not fit (then nothing is generated and
                      the queued tokens stay queued). Overflow never corrupts the cache.

Cost: cache slots are shared by the rows of the batch (see `KVCache`): every
forward takes `T` slots for all rows, where `T` is the longest row's new tokens
(1 in a decode step). Rows that stopped stay in the batch as masked padding
until the call ends; rows whose conversation is over are removed for good with
`session.drop(rows)`, which shrinks the batch (and the cost of every later step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from eto_ref.model import KVCache, Transformer

GREEDY_TEMPERATURE = 1e-5  # temperatures at or below this decode greedily


# --------------------------------------------------------------------------- next-token choice


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Next-token distribution (B, V) from logits (B, V): scale by 1/temperature, keep the
    top-k logits, then the nucleus (the smallest set of most likely tokens whose probability
    reaches top_p; the most likely token is always kept), renormalise. Float32.

    Tokens tied with the k-th logit are kept too (so a tie may keep more than k).
    """
    logits = logits.float() / max(temperature, GREEDY_TEMPERATURE)  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p  # the set is complete before this token; never the first
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row (B,) from logits (B, V); greedy (argmax) when temperature ~ 0."""
    if temperature <= GREEDY_TEMPERATURE:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits_to_probs(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------- conversations with a cache


@dataclass
class Completion:
    """One row's reply from `Session.generate`."""

    tokens: list[int]  # the generated tokens kept in the conversation (and the cache)
    text: str  # the decoded reply: cut before a stop string, without the eos token ("" without `decode`)
    reason: str  # why it stopped: "eos" | "stop_string" | "max_new_tokens" | "cache_full"


class Session:
    """A batch of conversations (rows) that keep one KV cache across their turns.

        session = Session(model, batch_size=2, max_len=4096)
        session.append([prompt_a, prompt_b])              # queue each row's tokens
        out = session.generate(64, stop_ids=[eos], stop_strings=["\\nObservation:"], decode=tok.decode)
        session.append([obs_a + header, obs_b + header])   # next turn: only these get prefilled
        out = session.generate(64, ...)
        session.drop([0])                                  # row 0's episode is over: stop paying for it

    Rows keep the ids 0..batch_size-1 they were created with, also after `drop`.
    `rows` arguments select a subset (default: every live row, in id order); the
    other rows are untouched (their queued tokens wait for a later call).
    """

    def __init__(self, model: Transformer, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        weight = next(model.parameters())
        self.model = model
        self.device = torch.device(device) if device is not None else weight.device
        self.cache = KVCache(model.config, batch_size, max_len, self.device, dtype or weight.dtype)
        self.rows: list[int] = list(range(batch_size))  # live row ids; rows[i] is cache row i
        self._history: dict[int, list[int]] = {r: [] for r in self.rows}  # conversation tokens per row
        self._pending: dict[int, list[int]] = {r: [] for r in self.rows}  # not yet fed to the model

    # ----------------------------------------------------------------- bookkeeping

    def history(self, row: int) -> list[int]:
        """The row's whole conversation so far: appended and returned generated tokens."""
        return list(self._history[row])

    @property
    def free_slots(self) -> int:
        """Cache slots left (shared by all rows)."""
        return self.cache.max_len - self.cache.length

    def append(self, rows_tokens: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> None:
        """Queue new tokens for each row (e.g. the prompt; later observation + assistant header).

        They are run through the model by the next `generate` (one batched prefill).
        """
        rows = self._select(rows)
        if len(rows_tokens) != len(rows):
            raise ValueError(f"append: {len(rows_tokens)} token lists for {len(rows)} rows")
        for row, tokens in zip(rows, rows_tokens):
            self._pending[row] += [int(t) for t in tokens]
            self._history[row] += [int(t) for t in tokens]

    def drop(self, rows: Sequence[int]) -> None:
        """Remove finished conversations from the batch for good (their cache rows are freed)."""
        gone = set(rows)
        keep = [i for i, r in enumerate(self.rows) if r not in gone]
        self.cache.keep_rows(torch.tensor(keep, dtype=torch.long, device=self.device))
        self.rows = [self.rows[i] for i in keep]
        for row in gone:
            self._pending.pop(row, None)

    def rewind(self, row: int, n: int) -> None:
        """Take back the last `n` tokens of a row's conversation (queued ones first, then cached ones).

        Cached tokens are taken back by marking their slots invalid, so they are never
        attended again. The agent uses this to replace the model's own tokenization of
        a reply by the tokenizer's canonical one.
        """
        if n <= 0:
            return
        if n > len(self._history[row]):
            raise ValueError(f"rewind: row {row} has only {len(self._history[row])} tokens, asked to take back {n}")
        del self._history[row][-n:]
        queued = min(n, len(self._pending[row]))
        if queued:
            del self._pending[row][-queued:]
        cached = n - queued
        if cached:
            i = self.rows.index(row)
            slots = self.cache.valid[i, : self.cache.length].nonzero().flatten()  # this row's real tokens, in order
            self.cache.valid[i, slots[-cached:]] = False

    def _select(self, rows: Sequence[int] | None) -> list[int]:
        rows = list(self.rows if rows is None else rows)
        unknown = [r for r in rows if r not in self.rows]
        if unknown:
            raise KeyError(f"rows {unknown} are not live in this session (live: {self.rows})")
        return rows

    # ----------------------------------------------------------------- the two kinds of forward

    def _prefill(self, rows: list[int]) -> torch.Tensor:
        """Feed the queued tokens of `rows` in one left-padded forward; returns next-token logits (B, V).

        Left padding puts every row's last real token in the last column. Rows not in
        `rows` are all padding: their slots stay invalid and their logits are meaningless.
        """
        T = max(len(self._pending[r]) for r in rows)
        ids = torch.zeros(self.cache.batch_size, T, dtype=torch.long)  # (B, T)
        real = torch.zeros(self.cache.batch_size, T, dtype=torch.bool)  # (B, T)
        for row in rows:
            i, tokens = self.rows.index(row), self._pending[row]
            ids[i, T - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            real[i, T - len(tokens):] = True
            self._pending[row] = []
        logits = self.model(ids.to(self.device), attention_mask=real.to(self.device), kv_cache=self.cache,
                            last_only=True)  # (B, 1, V)
        return logits[:, -1]  # (B, V)

    def _decode_step(self, tokens: torch.Tensor, feed: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) at the next slot, real where `feed` (B,); returns logits (B, V)."""
        return self.model(tokens[:, None], attention_mask=feed[:, None], kv_cache=self.cache, last_only=True)[:, -1]

    # ----------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(
        self,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        rows: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Continue each selected row's conversation; one `Completion` per row, in `rows` order.

        Prefills the queued tokens of the rows, then decodes one token per step for
        all rows still running (see the module docstring for the stop rules and what
        the cache keeps). `decode` (token ids -> text) is needed for `stop_strings`
        and fills `Completion.text`. `seed` makes sampling repeatable.
        """
        rows = self._select(rows)
        if not rows:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_strings and decode is None:
            raise ValueError("stop_strings need a `decode` function (token ids -> text)")
        empty = [r for r in rows if not self._pending[r]]
        if empty:
            raise ValueError(f"rows {empty} have no new tokens to feed: append the next turn first")
        if max(len(self._pending[r]) for r in rows) > self.free_slots:
            return [Completion([], "", "cache_full") for _ in rows]
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_ids, index = set(stop_ids), {row: self.rows.index(row) for row in rows}

        logits = self._prefill(rows)  # (B, V)
        new = {row: [] for row in rows}  # generated tokens per row
        done: dict[int, Completion] = {}
        slots: list[int] = []  # slots[j]: the cache slot where the j-th generated token was fed
        feed = torch.zeros(self.cache.batch_size, dtype=torch.bool, device=self.device)  # (B,) rows running
        feed[list(index.values())] = True
        while True:
            tokens = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            sampled = tokens.tolist()
            for row in rows:
                if row in done:
                    continue
                token = sampled[index[row]]
                new[row].append(token)
                stopped = self._check_stop(new[row], max_new_tokens, stop_ids, stop_strings, decode)
                if stopped is not None:
                    done[row] = stopped
                    feed[index[row]] = False
            if len(done) == len(rows):
                break
            if self.free_slots == 0:  # the sampled tokens cannot be fed: stop, keeping them
                for row in rows:
                    done.setdefault(row, Completion(new[row], self._text(new[row], decode), "cache_full"))
                break
            slots.append(self.cache.length)
            logits = self._decode_step(tokens, feed)  # (B, V)

        for row in rows:
            self._keep(row, new[row], done[row], slots)
        return [done[row] for row in rows]

    @staticmethod
    def _text(tokens: list[int], decode) -> str:
        return decode(tokens) if decode is not None else ""

    def _check_stop(self, tokens: list[int], max_new_tokens: int, stop_ids: set[int],
                    stop_strings: Sequence[str], decode) -> Completion | None:
        """The row's Completion if the newest token ends it, else None."""
        if tokens[-1] in stop_ids:
            return Completion(list(tokens), self._text(tokens[:-1], decode), "eos")
        if stop_strings:
            text = decode(tokens)
            cuts = [text.find(s) for s in stop_strings if s in text]
            if cuts:
                cut = min(cuts)
                keep = len(tokens) - 1  # keep the longest prefix whose text lies before the cut
                while keep > 0 and len(decode(tokens[:keep])) > cut:
                    keep -= 1
                return Completion(tokens[:keep], text[:cut], "stop_string")
        if len(tokens) >= max_new_tokens:
            return Completion(list(tokens), self._text(tokens, decode), "max_new_tokens")
        return None

    def _keep(self, row: int, generated: list[int], completion: Completion, slots: list[int]) -> None:
        """Make the conversation (and the cache) hold exactly the returned tokens.

        Generated token j (0-based) sits in slot `slots[j]` when it was fed; the row's
        last generated token was never fed. Kept: the last one is queued for the next
        forward. Cut off (stop string): its slot is invalidated, never attended again.
        """
        kept = len(completion.tokens)
        self._history[row] += completion.tokens
        if kept == len(generated):
            self._pending[row] = [generated[-1]]
            return
        i = self.rows.index(row)
        for j in range(kept, len(generated) - 1):
            self.cache.valid[i, slots[j]] = False


# --------------------------------------------------------------------------- one-shot helper


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             max_len: int | None = None, **kwargs) -> list[Completion]:
    """Complete each prompt once (batched); `kwargs` as `Session.generate`.

    The cache is sized for the longest prompt plus `max_new_tokens` unless `max_len` is given.
    """
    max_len = max_len or max(len(p) for p in prompts) + max_new_tokens
    session = Session(model, batch_size=len(prompts), max_len=max_len)
    session.append(prompts)
    return session.generate(max_new_tokens, **kwargs)
