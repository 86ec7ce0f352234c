"""Sampling with a KV cache that lives across the turns of agent conversations.

Three layers, bottom-up:

1. `logits_to_probs` + `sample_rows`: next-token choice from logits (greedy,
   temperature, top-k, top-p), each row with its own seeded `torch.Generator`, so
   a row's random draws do not depend on which other rows share its batch. Its
   logits can, in their last bits: a forward's floating-point sums are not always
   ordered the same way in another batch (a decode step of one row against two, for
   one), so a near-tie between two tokens can go either way, most of all in
   bfloat16 (8 bits of mantissa). An evaluation resumed after an interruption runs
   its remaining episodes beside other rows than an uninterrupted one would, and can
   part from it at such a tie.
2. `Session`: a batch of conversations (rows) sharing one `KVCache`, in which each
   row keeps its own length. A turn is
       session.append(...)     queue each row's new tokens (prompt, or observation + assistant header)
       session.generate(...)   prefill: the queued tokens of all rows in ONE right-padded forward,
                               then decode one token per step for every running row until each stops.
   `generate` is a loop over `step`: one token for every replying row, and a
   prefill for the rows whose next turn is queued. The agent (eto_ref/agent.py
   `run_episodes`) calls `step` itself, so that a row whose reply ended gets its
   observation, or its next task, while the other rows go on.
   The generated tokens stay in the cache, so the next turn only prefills the new
   observation. `start(row, tokens)` begins a new conversation in a row while the
   others go on (continuous batching: a finished episode's row takes the next task),
   and with a `prefix` (the instruction every prompt begins with) that row gets the
   prefix's keys/values copied in instead of computing them again.
   `Session(record_logprobs=True)` also returns log pi of each kept token (`Completion.logprobs`).
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
                      generated tokens that lie wholly before that point; the cut-off
                      ones are taken back from the cache: it holds exactly `tokens`.
                      (When the stop string starts inside a token, that token is cut
                      too, and `text` is a few characters longer than decode(tokens).)
    "max_new_tokens"  the row reached `max_new_tokens` tokens; all are kept.
    "cache_full"      the row's next token would not fit in `max_len` slots (all are
                      kept), or its queued tokens do not fit (then nothing is generated
                      and they stay queued). Overflow never corrupts the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from eto_ref.config import setting
from eto_ref.kv_cache import KVCache
from eto_ref.model import SharedPrefixKV, Transformer

GREEDY_TEMPERATURE = 1e-5  # temperatures at or below this decode greedily


@dataclass(frozen=True)
class SamplingConfig:
    """How replies are sampled (the agent's and the sampler's one source for these settings)."""

    max_new_tokens: int = setting(512, "most tokens per reply (the official code: 512)", low=1)
    temperature: float = setting(0.0, "0 = greedy, the paper's exploration and evaluation", low=0)
    top_k: int | None = setting(None, "sample among the k most likely tokens only", low=1)
    top_p: float | None = setting(None, "sample within the smallest set of tokens of this total probability", low=0, above=True, high=1)

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


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


def sample_rows(logits: torch.Tensor, sampling: SamplingConfig,
                generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): argmax when greedy, else a draw per row
    from its own generator (None: torch's global one)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)  # (B, V)
    generators = generators or [None] * len(probs)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])  # (B,)


def row_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------- conversations with a cache


@dataclass
class Completion:
    """One row's reply from `Session.generate`."""

    tokens: list[int]  # the generated tokens kept in the conversation (and the cache)
    text: str  # the decoded reply: cut before a stop string, without the eos token ("" without `decode`)
    reason: str  # why it stopped: "eos" | "stop_string" | "max_new_tokens" | "cache_full"
    logprobs: list[float] | None = None  # log pi of each of `tokens` (float32), with Session(record_logprobs=True)


class Session:
    """A batch of conversations (rows) that keep one KV cache across their turns.

        session = Session(model, batch_size=2, max_len=4096)
        session.append([prompt_a, prompt_b])              # queue each row's tokens
        out = session.generate(SamplingConfig(64), stop_ids=[eos], stop_strings=["\\nObservation:"],
                               decode=tok.decode)
        session.append([obs_a + header, obs_b + header])   # next turn: only these get prefilled
        out = session.generate(SamplingConfig(64), ...)
        session.start(0, prompt_c)                         # row 0's episode is over: a new one starts there
        session.drop([1])                                  # no more work for row 1: stop paying for it

    Rows keep the ids 0..batch_size-1 they were created with, also after `drop`.
    `rows` arguments select a subset (default: every live row, in id order); the
    other rows are untouched (their queued tokens wait for a later call).
    """

    def __init__(self, model: Transformer, batch_size: int, max_len: int, prefix: Sequence[int] = (),
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 record_logprobs: bool = False):
        weight = next(model.parameters())
        self.model = model
        self.device = torch.device(device) if device is not None else weight.device
        self.cache = KVCache(model.config, batch_size, max_len, device=self.device, dtype=dtype or weight.dtype)
        self.rows: list[int] = list(range(batch_size))  # live row ids; rows[i] is cache row i
        self._history: dict[int, list[int]] = {r: [] for r in self.rows}  # conversation tokens per row
        self._pending: dict[int, list[int]] = {r: [] for r in self.rows}  # not yet fed to the model
        self._generators: dict[int, torch.Generator | None] = {r: None for r in self.rows}
        self._replies: dict[int, list[int]] = {}  # replying row -> tokens generated so far in its reply
        self._fed: dict[int, int] = {}  # replying row -> how many of them are in the cache
        self._logits: dict[int, torch.Tensor] = {}  # replying row -> its next-token logits (V,)
        # replying row -> log pi of each token of its reply so far: the model's own distribution (temperature 1,
        # no top-k/p), as the training forward scores it; None: not recorded (it costs a log-softmax per step)
        self._logps: dict[int, list[float]] | None = {} if record_logprobs else None
        self.prefix = [int(t) for t in prefix]
        self._prefix_kv: SharedPrefixKV | None = None  # computed on first use

    # ----------------------------------------------------------------- bookkeeping

    def history(self, row: int) -> list[int]:
        """The row's whole conversation so far: appended and returned generated tokens."""
        return list(self._history[row])

    def cached(self, row: int) -> int:
        """Tokens of the row held in the cache."""
        return self.cache.lengths[self.rows.index(row)]

    @property
    def free_slots(self) -> int:
        """Cache slots left for the fullest row."""
        return self.cache.max_len - max(self.cache.lengths, default=0)

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

    @torch.inference_mode()
    def start(self, row: int, tokens: Sequence[int], seed: int | None = None) -> None:
        """Begin a new conversation in `row` (forgetting its old one) with `tokens` queued.

        When `tokens` begin with the session's prefix, the prefix's keys/values are
        copied into the row (the prefix runs through the model once per session, at
        batch 1) and only the rest is queued. `seed` seeds the row's own sampler.
        """
        self._select([row])
        tokens = [int(t) for t in tokens]
        i = self.rows.index(row)
        P = len(self.prefix)
        if P and tokens[:P] == self.prefix and len(tokens) > P:
            self.cache.set_prefix([i], self._prefix())
            self._pending[row] = tokens[P:]
        else:
            self.cache.reset([i])
            self._pending[row] = tokens
        self._history[row] = list(tokens)
        self.seed(row, seed)

    def seed(self, row: int, seed: int | None) -> None:
        """Give `row` its own sampling generator (None: torch's global one)."""
        self._generators[row] = None if seed is None else row_generator(seed, self.device)

    def _prefix(self) -> SharedPrefixKV:
        if self._prefix_kv is None:
            self._prefix_kv = self.model.prefill_prefix(self.prefix)
        return self._prefix_kv

    @torch.inference_mode()
    def drop(self, rows: Sequence[int]) -> None:
        """Remove finished conversations from the batch for good (their cache rows are freed)."""
        gone = set(rows)
        keep = [i for i, r in enumerate(self.rows) if r not in gone]
        self.cache.keep_rows(torch.tensor(keep, dtype=torch.long))
        self.rows = [self.rows[i] for i in keep]
        for row in gone:
            for state in (self._pending, self._replies, self._fed, self._logits, self._logps or {}):
                state.pop(row, None)

    def rewind(self, row: int, n: int) -> None:
        """Take back the last `n` tokens of a row's conversation (queued ones first, then cached ones).

        The agent uses this to replace the model's own tokenization of a reply by the
        tokenizer's canonical one.
        """
        if n <= 0:
            return
        if n > len(self._history[row]):
            raise ValueError(f"rewind: row {row} has only {len(self._history[row])} tokens, asked to take back {n}")
        del self._history[row][-n:]
        queued = min(n, len(self._pending[row]))
        if queued:
            del self._pending[row][-queued:]
        if n - queued:
            self.cache.rewind(self.rows.index(row), n - queued)

    def _select(self, rows: Sequence[int] | None) -> list[int]:
        rows = list(self.rows if rows is None else rows)
        unknown = [r for r in rows if r not in self.rows]
        if unknown:
            raise KeyError(f"rows {unknown} are not live in this session (live: {self.rows})")
        return rows

    # ----------------------------------------------------------------- the two kinds of forward

    def _prefill(self, rows: list[int]) -> torch.Tensor:
        """Feed the queued tokens of `rows` (and only those rows) in one right-padded forward;
        returns their next-token logits (len(rows), V). The LM head runs only at each row's last token."""
        T = max(len(self._pending[r]) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)  # (b, T)
        real = torch.zeros(len(rows), T, dtype=torch.bool)  # (b, T)
        last = torch.zeros(len(rows), dtype=torch.long)  # (b,) index of each row's last token
        for i, row in enumerate(rows):
            tokens = self._pending[row]
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            real[i, : len(tokens)] = True
            last[i] = len(tokens) - 1
            self._pending[row] = []
        every_row = len(rows) == len(self.rows)
        self.cache.select(None if every_row and rows == self.rows else [self.rows.index(r) for r in rows])
        logits = self.model.next_token_logits(ids.to(self.device), real, self.cache,  # real: on the host
                                              last.to(self.device))  # (b, V)
        self.cache.select(None)
        return logits

    def _decode(self, replying: list[int]) -> None:
        """Feed the token each replying row sampled last, one per cache row, in one forward."""
        tokens = torch.zeros(len(self.rows), dtype=torch.long)  # (B,) built on the host, copied once
        feed = torch.zeros(len(self.rows), dtype=torch.bool)  # (B,) False: row not replying; stays on the host
        for row in replying:
            tokens[self.rows.index(row)], feed[self.rows.index(row)] = self._replies[row][-1], True
            self._fed[row] += 1
        last = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)  # (B,)
        step_logits = self.model.next_token_logits(tokens[:, None].to(self.device), feed[:, None], self.cache,
                                                   last)  # (B, V)
        for row in replying:
            self._logits[row] = step_logits[self.rows.index(row)]

    # ----------------------------------------------------------------- generation

    @torch.inference_mode()
    def step(self, sampling: SamplingConfig, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
             decode: Callable[[list[int]], str] | None = None,
             rows: Sequence[int] | None = None) -> list[tuple[int, Completion]]:
        """One token for every replying row; returns the (row, Completion) of the replies that ended.

        1. The token each replying row sampled at the previous step is fed (one decode forward).
        2. The rows of `rows` (default: every live row) that have tokens queued and are not
           replying start a reply: their queued tokens are prefilled in one forward. A row
           whose queued tokens do not fit in the cache ends at once ("cache_full").
        3. Every replying row samples its next token; a reply that stops is returned.

        Before the next step the caller queues an ended row's next turn (`append`, or
        `start` for a new conversation), or `drop`s the row. A row whose reply ended has
        its next tokens prefilled at the next step while the other rows go on decoding:
        no row waits for the slowest reply of the batch (continuous batching).
        """
        replying = [r for r in self.rows if r in self._replies]
        if replying:
            self._decode(replying)
        starting = [r for r in self.rows if (rows is None or r in rows) and r not in self._replies
                    and self._pending[r]]
        ended = [(r, Completion([], "", "cache_full")) for r in starting if not self._fits(r, 0)]
        starting = [r for r in starting if self._fits(r, 0)]
        if starting:
            for row, row_logits in zip(starting, self._prefill(starting)):
                self._replies[row], self._fed[row], self._logits[row] = [], 0, row_logits
                if self._logps is not None:
                    self._logps[row] = []
        if not self._replies and not ended:
            raise ValueError("step: no row is replying or has tokens queued: append a turn first")
        return ended + self._sample_step(sampling, stop_ids, stop_strings, decode)

    @torch.inference_mode()
    def generate(self, sampling: SamplingConfig, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 decode: Callable[[list[int]], str] | None = None,
                 rows: Sequence[int] | None = None) -> list[Completion]:
        """Continue each selected row's conversation by one reply; one `Completion` per row, in `rows` order.

        `step` until every selected row's reply has ended (see the module docstring for
        the stop rules and what the cache keeps). `decode` (token ids -> text) is needed
        for `stop_strings` and fills `Completion.text`.
        """
        rows = self._check_generate(sampling, stop_strings, decode, rows)
        done: dict[int, Completion] = {}
        while len(done) < len(rows):
            waiting = [r for r in rows if r not in done]
            done.update(self.step(sampling, stop_ids, stop_strings, decode, rows=waiting))
        return [done[row] for row in rows]

    def _sample_step(self, sampling, stop_ids, stop_strings, decode) -> list[tuple[int, Completion]]:
        """Sample the next token of every replying row; return the (row, Completion) of the replies that ended."""
        rows = sorted(self._replies)
        if not rows:
            return []
        logits = torch.stack([self._logits[r] for r in rows])  # (b, V)
        picked = sample_rows(logits, sampling, [self._generators[r] for r in rows])  # (b,)
        if self._logps is not None:
            logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, picked[:, None]).squeeze(-1)  # (b,)
            for row, logp in zip(rows, logps.tolist()):
                self._logps[row].append(logp)
        ended = []
        for row, token in zip(rows, picked.tolist()):
            reply = self._replies[row]
            reply.append(token)
            completion = self._check_stop(reply, sampling.max_new_tokens, stop_ids, stop_strings, decode)
            if completion is None and not self._fits(row, 1):  # the sampled token could not be fed
                completion = Completion(reply, self._text(reply, decode), "cache_full")
            if completion is not None:
                if self._logps is not None:
                    completion.logprobs = self._logps.pop(row)[:len(completion.tokens)]
                self._keep(row, completion, self._fed.pop(row))
                del self._replies[row], self._logits[row]
                ended.append((row, completion))
        return ended

    def _check_generate(self, sampling, stop_strings, decode, rows) -> list[int]:
        rows = self._select(rows)
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        if stop_strings and decode is None:
            raise ValueError("stop_strings need a `decode` function (token ids -> text)")
        empty = [r for r in rows if not self._pending[r]]
        if empty:
            raise ValueError(f"rows {empty} have no new tokens to feed: append the next turn first")
        return rows

    def _fits(self, row: int, extra: int) -> bool:
        """Whether the row's queued tokens plus `extra` more fit in the cache."""
        return self.cached(row) + len(self._pending[row]) + extra <= self.cache.max_len

    @staticmethod
    def _text(tokens: list[int], decode) -> str:
        return decode(tokens) if decode is not None else ""

    def _check_stop(self, tokens: list[int], max_new_tokens: int, stop_ids: Sequence[int],
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

    def _keep(self, row: int, completion: Completion, fed: int) -> None:
        """Make the conversation (and the cache) hold exactly the returned tokens.

        The first `fed` generated tokens are in the cache. Kept tokens not fed yet (the
        last one of a reply) are queued for the next forward; fed tokens that were cut
        off (stop string) are taken back from the cache.
        """
        kept = len(completion.tokens)
        self._history[row] += completion.tokens
        if kept >= fed:
            self._pending[row] = completion.tokens[fed:]
        else:
            self.cache.rewind(self.rows.index(row), fed - kept)


# --------------------------------------------------------------------------- one-shot helper


def generate(model: Transformer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
             max_len: int | None = None, seed: int | None = None, **kwargs) -> list[Completion]:
    """Complete each prompt once (batched); row i samples with seed `seed + i`; `kwargs` as `Session.generate`.

    The cache holds the longest prompt plus `max_new_tokens` unless `max_len` is given.
    """
    max_len = max_len or max(len(p) for p in prompts) + sampling.max_new_tokens
    session = Session(model, batch_size=len(prompts), max_len=max_len)
    for row, prompt in enumerate(prompts):
        session.start(row, prompt, seed=None if seed is None else seed + row)
    return session.generate(sampling, **kwargs)
