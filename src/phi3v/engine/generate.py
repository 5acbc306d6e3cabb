"""The generation loop: one loop over a set of rows, for single, streamed and batched generation.

A `Row` is one sequence: its prompt (ids and image features), its own sampling settings and stop
rules, its text so far. `DecodeLoop` runs rows together; each `step()`:

    1. feed     the token each running row sampled last step goes through the decoder, all rows
                in one call (RunningBatch); a Phi-3.5-vision row crossing 4096 is re-prefilled
    2. admit    rows added since the last step, first come first served: a row whose image
                features are still to compute (Row.features) runs one piece of its vision tower
                (at most vision_chunk crops); a row with its features is prefilled alone (reusing
                a cached prefix when it brings one) and joins the running batch. While rows are
                running, a step does one piece of such newcomer work at most: one vision piece
                (with `vision_layers`, that many of the tower's layers of it), or prefill of at
                most `prefill_chunk` prompt tokens, so a newcomer never stalls the others'
                streams for long (it joins after a few steps); with step_budget
                (engine/step_budget.py) those are the smallest pieces and a step carries what
                fits a multiple of the fastest plain decode step. With nothing running
                a prompt is prefilled whole, and every waiting row with its features joins.
                fuse_prefill (default): while rows run, that prefill is not a pass of its own but
                goes through step 1's decoder pass (engine/fused_step.py: the running rows' tokens
                and the prompt chunk share the weight reads; attention per sequence), same budget.
    3. sample   every running row picks its next token, pushes it to its text, and leaves the
                batch when it is done (stop id, stop string, max_new_tokens)

and returns the (row, text delta) events of that step. Rows can be added and cancelled between
steps, so the same loop serves one request, a fixed batch, or a server's continuous batch.
Feeding a token is deferred to the next step, so nothing is computed after a row's last token.

Numerics: a row alone is exactly the single-sequence path (no padding, no mask in decode); in a
batch, each row keeps its own positions and its pad slots are masked, so greedy results equal
running it alone up to float rounding of the batched products.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..options import GenerationOptions
from ..results import Completion, Timings, Usage
from .decoder import KVCache, build_attention_mask
from .chunked_prefill import prefill_chunked
from .fused_step import Group
from .constraints import ConstraintState
from .model import Phi3VForCausalLM
from .running_batch import RunningBatch
from .step_budget import StepBudget
from .sampling import Sampler
from .text import TextAssembler


# A prompt part longer than this goes through the decoder in pieces of this many tokens
# (chunked_prefill: one pass over T tokens holds (T, 16384) MLP activations per layer at full size,
# ~0.8 GiB at 24k tokens, a 32-frame video; 1024 rows keep the GEMMs as efficient as one pass).
ONE_PASS_MAX_TOKENS = 1024


@torch.inference_mode()
def prefill(model: Phi3VForCausalLM, embeds: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
    """embeds (L, hidden) for positions [start, start+L) -> last-position logits (V,) float32."""
    L = embeds.shape[0]
    positions = torch.arange(start, start + L, device=embeds.device)[None]
    mask = build_attention_mask(L, start, None, embeds.device)
    h = model.forward_hidden(embeds[None], positions, cache, mask)
    return model.logits(h[0, -1])


@dataclass(eq=False)  # rows are compared by identity, never by value (they hold tensors)
class Row:
    """One sequence in a DecodeLoop. Give the first three (and optionally a text assembler, a
    cache holding a reused prefix, timings); the loop fills the rest."""

    prompt_ids: torch.Tensor  # (L,) int64, image k's placeholders = -k
    image_embeds: list[torch.Tensor]  # image k's features (T_k, hidden) at index k-1
    options: GenerationOptions  # max_new_tokens already fitted to the context
    text: TextAssembler | None = None  # None: token ids only (no detokenization, no stop strings)
    constraint: ConstraintState | None = None  # structured output: only tokens its grammar allows
    parse: Callable[[str], Any] | None = None  # the finished text -> Completion.parsed
    cache: KVCache | None = None  # a one-row cache whose first `reuse_prefix` slots hold this prompt's prefix
    reuse_prefix: int = 0
    retain: bool = False  # keep the row's KV cache in `kv` when it ends (a follow-up may reuse it)
    # Image features still to compute (image_features.FeatureJob: step() -> True once done, then
    # .features[0] is image_embeds); the loop steps it a piece at a time before prefilling.
    features: Any = None
    timings: Timings = field(default_factory=Timings)
    started: float = field(default_factory=time.perf_counter)  # request start, for first_token_s

    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" once it ended
    error: BaseException | None = None  # what ended it with "error"
    long_rope: bool = False  # its cached keys are rotated with the long factors
    kv: KVCache | None = None  # with retain: its cache at the end (prompt + generated[:-1])
    _sampler: Sampler | None = None
    _pending: int | None = None  # sampled, not yet fed to the decoder
    _prefilled: int | None = None  # prompt tokens in its cache so far (None: prefill not started)
    _embeds: torch.Tensor | None = None  # (L - start, hidden) prompt embeddings while prefilling
    _first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in the sequence once the pending one is fed."""
        return self.prompt_ids.numel() + len(self.generated)

    def completion(self) -> Completion:
        """Text, finish reason, usage and timings (call once the row is done)."""
        ids = self.prompt_ids
        usage = Usage(prompt_tokens=ids.numel(), image_tokens=int((ids < 0).sum()),
                      completion_tokens=len(self.generated))
        text = self.text.text if self.text is not None else ""
        parsed = None
        if self.parse is not None and self.finish_reason == "stop":
            try:
                parsed = self.parse(text)
            except ValueError:  # a stop string cut the structure short: no data, the text stays
                parsed = None
        return Completion(text, self.finish_reason or "cancelled", usage, self.timings, list(self.generated),
                          parsed)


class DecodeLoop:
    """Rows decoding together; see the module docstring. Not thread-safe: one thread steps it."""

    def __init__(self, model: Phi3VForCausalLM, stop_ids: frozenset[int], rope_switch: str = "mixed",
                 logits_hook=None, prefill_chunk: int | None = None, vision_chunk: int | None = None,
                 vision_layers: int | None = None, fuse_prefill: bool = True, step_budget: float | None = None):
        """rope_switch: "mixed" | "recompute" (config.ROPE_SWITCH_POLICIES). logits_hook(row, step,
        logits) sees the float32 logits each token is chosen from (for tests). prefill_chunk:
        prompt tokens prefilled per step at most while other rows are running (None: whole prompts
        at once; with no row running a prompt is always prefilled whole). A prompt longer
        than original_max_position_embeddings is prefilled at once all the same: its every
        position is rotated with the long factors, which a call over a shorter chunk would not do.
        vision_chunk: image crops a newcomer encodes per step while other rows are running (one
        vision-tower call; 0: all at once); None, or with no row running: the tower's own
        vision_chunk (phi3v.load(vision_chunk=...), which bounds its memory). vision_layers: while
        rows run, a step runs at most this many of the tower's layers on a piece (None or 0: all).
        fuse_prefill: while rows run, a newcomer's prefill chunk goes through the same decoder pass
        as their step (engine/fused_step.py: the weights are read once for both); False: a pass of
        its own after theirs. step_budget: while rows run, a step with newcomer work may take about
        this many times the fastest plain decode step (engine/step_budget.py): vision pieces back to
        back, prefill chunks sized from the measured prefill rate, prefill_chunk the smallest;
        None: fixed pieces (one vision piece, prefill_chunk tokens per step)."""
        self.model, self.stop_ids, self.rope_switch = model, stop_ids, rope_switch
        self.fuse_prefill = fuse_prefill
        self.logits_hook = logits_hook
        self.prefill_chunk, self.vision_chunk, self.vision_layers = prefill_chunk, vision_chunk, vision_layers
        self.budget = StepBudget(step_budget, prefill_chunk, ONE_PASS_MAX_TOKENS)
        self.batch = RunningBatch(model)
        self.running: list[Row] = []  # in batch order
        self.waiting: list[Row] = []
        self._logits: torch.Tensor | None = None  # (len(running), V) next-token logits

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, row: Row) -> Row:
        """Queue a row; it is prefilled and joins at the next step()."""
        row._sampler = Sampler(row.options, None)
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """End a row now (finish_reason "cancelled"); its cache is consistent, so it is retained
        when asked. Rows already done are left as they are."""
        if row.done:
            return
        if any(r is row for r in self.waiting):
            self.waiting = [r for r in self.waiting if r is not row]
            row.cache = row._embeds = row.features = None  # a part-encoded or part-prefilled prompt's memory goes now
        elif any(r is row for r in self.running):
            self._leave({id(row)})
        row.finish_reason = "cancelled"
        self._finish_timings(row)

    def step(self) -> list[tuple[Row, str]]:
        """One decoding step of every row -> [(row, text delta)] for each row that produced a
        token (a row whose `done` became True ended in this step)."""
        events: list[tuple[Row, str]] = []
        fused: list[tuple[Row, Group, int, bool]] = []  # prefill parts that share the rows' pass
        if self.running:
            crossing = self._crossing()
            if self.fuse_prefill and not crossing:
                fused = self._fused_parts(events)
            self._feed(crossing, fused)
        if not fused:  # a fused step did this step's newcomer work already
            for row in self._admit():
                events.append((row, ""))  # failed to start: finish_reason "error", row.error set
        if self.running:
            events.extend(self._sample())
        return events

    # -- the three phases ------------------------------------------------------------------------
    def _crossing(self) -> list[int]:
        """Running rows whose sequence now leaves the short-RoPE range under "recompute"."""
        if self.rope_switch != "recompute":
            return []
        text_cfg = self.model.cfg.text
        return [j for j, r in enumerate(self.running) if not r.long_rope and text_cfg.uses_long_rope(r.length)]

    def _fused_parts(self, events: list) -> list[tuple[Row, Group, int, bool]]:
        """The prefill parts this step's decoder pass takes besides the running rows' tokens: what
        _admit would prefill (first come, first served, rows with their image features, at most
        prefill_chunk tokens in all) -> [(row, group, tokens, whether its prompt is then all in)].
        A row that cannot start gets finish_reason "error" and an event."""
        parts, budget = [], self.budget.prefill_tokens()
        for row in list(self.waiting):
            if row.features is not None or (budget is not None and budget <= 0):
                break
            try:
                self._prefill_setup(row)
            except Exception as err:  # noqa: BLE001 - only this row is concerned
                events.append((self._fail_waiting(row, err), ""))
                continue
            group, n, last = self._next_part(row, budget)
            parts.append((row, group, n, last))
            budget = None if budget is None else budget - n
            if not last:
                break  # the rest of its prompt goes in the next steps
        return parts

    @torch.inference_mode()
    def _feed(self, crossing: list[int], fused: list[tuple[Row, Group, int, bool]]) -> None:
        """The running rows' pending tokens through the decoder -> self._logits. With `fused`
        parts (_fused_parts), those go through the same pass; a row whose prompt is then all in
        joins the batch, its logits after the running rows'."""
        text_cfg = self.model.cfg.text
        try:
            t0 = time.perf_counter()
            if fused:
                logits = self.batch.step_with([r._pending for r in self.running], [p[1] for p in fused],
                                              [p[3] for p in fused])  # (B + joining, V)
                took = time.perf_counter() - t0
                self.budget.saw_prefill(sum(p[2] for p in fused), took, fused=True)
                for row, _, n, last in fused:
                    self._part_done(row, n, last)
                    row.timings.prefill_s += took
            elif len(crossing) == len(self.running):
                self.batch.advance()  # every row is re-prefilled below: skip the shared step
                logits = torch.empty(len(self.running), text_cfg.vocab_size,
                                     device=self.model.lm_head.weight.device)
            else:
                logits = self.batch.step([r._pending for r in self.running])
                if not crossing:
                    self.budget.saw_decode(time.perf_counter() - t0)
            for j in crossing:
                logits[j] = self._recompute_long(j)
        except Exception as err:  # noqa: BLE001 - the batch's cache is no longer consistent
            for row, *_ in fused:
                self._fail_waiting(row, err)
            self._fail_running(err)
            raise
        for r in self.running:
            r._pending = None
        for row, _, _, last in fused:
            if last:  # fused parts come first come, first served: the joining rows lead the queue
                self._join(row)
        self._logits = logits  # rows that joined: their logits follow the B rows', in order

    def _admit(self) -> list[Row]:
        """Work on waiting rows (first come, first served) within this step's budget: one vision
        piece, or prefill (at most prefill_chunk tokens while rows run); finished rows join the
        batch -> rows that failed."""
        failed = []
        new_logits = []
        running = bool(self.running)  # rows are decoding: protect their next token
        budget = self.budget.prefill_tokens() if running else None  # None: no limit
        worked = False  # newcomer work done in this step
        while self.waiting:
            row = self.waiting[0]
            try:
                if row.features is not None:  # its images first, one piece per step
                    if worked and (running or self.running):
                        break
                    worked = True
                    if not self._vision_pieces(row, running) or running:
                        break  # more pieces to go, or its prefill waits for the next step
                if budget is not None and budget <= 0:
                    break
                t0 = time.perf_counter()
                logits, used = self._prefill(row, budget)
                if running:
                    self.budget.saw_prefill(used, time.perf_counter() - t0, fused=False)
                worked = True
            except Exception as err:  # noqa: BLE001 - only this row is concerned
                failed.append(self._fail_waiting(row, err))
                continue
            if budget is not None:
                budget -= used
            if logits is None:
                break  # part of its prompt is left for the next steps
            self._join(row)
            new_logits.append(logits[None])
        if new_logits:
            parts = ([self._logits] if self._logits is not None else []) + new_logits
            self._logits = torch.cat(parts)
        return failed

    def _sample(self) -> list[tuple[Row, str]]:
        events, leaving = [], set()
        for j, row in enumerate(self.running):
            opts = row.options
            seen = None
            if opts.repetition_penalty != 1.0:
                text_ids = row.prompt_ids[row.prompt_ids >= 0]
                seen = torch.cat([text_ids, torch.tensor(row.generated, dtype=torch.long)])
            if self.logits_hook is not None:
                self.logits_hook(row, len(row.generated), self._logits[j])
            try:
                logits = self._logits[j]
                if row.constraint is not None:  # structured output: the grammar's tokens only
                    allowed = row.constraint.allowed().to(logits.device)
                    logits = logits.masked_fill(~allowed, float("-inf"))
                token = row._sampler(logits, seen)
                if row.constraint is not None:
                    row.constraint.advance(token)
                delta = row.text.push(token) if row.text is not None else ""
            except Exception as err:  # noqa: BLE001 - one row's sampling or text never ends the others
                row.finish_reason, row.error, row.retain = "error", err, False
                leaving.add(id(row))
                events.append((row, ""))
                continue
            row.generated.append(token)
            now = time.perf_counter()
            if row._first_token_at is None:
                row._first_token_at = now
                row.timings.first_token_s = now - row.started
            if token in self.stop_ids or (row.text is not None and row.text.finish_reason == "stop") \
                    or (row.constraint is not None and row.constraint.finished):
                row.finish_reason = "stop"
            elif len(row.generated) >= opts.max_new_tokens:
                if row.text is not None:
                    delta += row.text.flush()  # text held back for a stop string that never came
                row.finish_reason = "length"
            else:
                row._pending = token
            if row.done:
                leaving.add(id(row))
            events.append((row, delta))
        self._logits = None
        if leaving:
            self._leave(leaving)
            for row, _ in events:
                if row.done:
                    self._finish_timings(row)
        return events

    # -- helpers ---------------------------------------------------------------------------------
    def _vision_pieces(self, row: Row, running: bool) -> bool:
        """This step's vision work for row -> True once its features are all in. With nothing
        running: one piece of the tower's own size (a cancellation is seen between pieces). While
        rows run: pieces of vision_chunk crops x vision_layers layers, back to back as long as the
        step budget allows (at least one)."""
        if not running:
            return self._vision_piece(row, None, None)
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            if self._vision_piece(row, self.vision_chunk, self.vision_layers):
                return True
            now = time.perf_counter()
            if not self.budget.more_vision(now - start, now - t0):
                return False

    @staticmethod
    def _vision_piece(row: Row, chunk: int | None, layers: int | None) -> bool:
        """One piece of row's image features (at most `chunk` crops through the tower, None: the
        tower's vision_chunk; at most `layers` of its layers, None: all) -> True once they are all
        in (row.image_embeds set)."""
        t0 = time.perf_counter()
        done = row.features.step(chunk, layers)
        row.timings.vision_s += time.perf_counter() - t0
        if done:
            row.image_embeds, row.features = row.features.features[0], None
        return done

    @torch.inference_mode()
    def _prefill(self, row: Row, budget: int | None) -> tuple[torch.Tensor | None, int]:
        """Prefill the next part of row's prompt (at most `budget` tokens, unless the prompt needs
        the long factors) -> (last-position logits once the whole prompt is in, tokens done)."""
        t0 = time.perf_counter()
        self._prefill_setup(row)
        part, n, last = self._next_part(row, budget)
        if n > ONE_PASS_MAX_TOKENS:  # a long prompt alone (a video's): bounded activations, same numerics
            logits = prefill_chunked(self.model, part.embeds[0], row._prefilled, part.cache,
                                     chunk=ONE_PASS_MAX_TOKENS, rope_len=row.prompt_ids.numel())
        else:
            logits = prefill(self.model, part.embeds[0], row._prefilled, part.cache)  # (V,)
        logits = logits if last else None
        self._part_done(row, n, last)
        row.timings.prefill_s += time.perf_counter() - t0
        return logits, n

    def _prefill_setup(self, row: Row) -> None:
        """Before row's first prefill part: its one-row cache (holding a reused prefix, if any)
        and its prompt's embeddings past that prefix (row._embeds (L - start, hidden))."""
        if row._prefilled is not None:
            return
        start = row.reuse_prefix if row.cache is not None else 0
        if row.cache is None:
            row.cache = self.model.new_cache()
        row.cache.length = start
        if row.image_embeds:  # placeholders may sit in the reused part: embed all, keep the rest
            row._embeds = self.model.embed(row.prompt_ids, row.image_embeds)[start:]
        else:
            row._embeds = self.model.embed(row.prompt_ids[start:])
        row._prefilled = start

    def _next_part(self, row: Row, budget: int | None) -> tuple[Group, int, bool]:
        """Row's next prefill part (at most `budget` tokens, unless the prompt needs the long
        factors: then all of it) as a decoder group (1, n, hidden) at positions [done, done + n)
        -> (group, n, whether it is the prompt's last part)."""
        L = row.prompt_ids.numel()
        start, done = L - row._embeds.shape[0], row._prefilled
        n = L - done if budget is None or self.model.cfg.text.uses_long_rope(L) else min(budget, L - done)
        embeds = row._embeds[None, done - start:done - start + n]
        positions = torch.arange(done, done + n, device=embeds.device)[None]
        mask = build_attention_mask(n, done, None, embeds.device)
        return Group(embeds, positions, row.cache, mask), n, done + n == L

    def _part_done(self, row: Row, n: int, last: bool) -> None:
        row._prefilled += n
        if last:
            row._embeds = None
            row.long_rope = self.model.cfg.text.uses_long_rope(row.prompt_ids.numel())

    def _join(self, row: Row) -> None:
        """The first waiting row, its prompt all in its cache, joins the running batch."""
        self.waiting.pop(0)
        self.batch.join(row.cache)
        row.cache = None  # owned by the batch now
        self.running.append(row)

    def _fail_waiting(self, row: Row, err: BaseException) -> Row:
        """A waiting row could not start: it leaves the queue with finish_reason "error"."""
        self.waiting = [r for r in self.waiting if r is not row]
        row.finish_reason, row.error, row._embeds, row.features = "error", err, None, None
        row.cache = None
        return row

    @torch.inference_mode()
    def _recompute_long(self, j: int) -> torch.Tensor:
        """Phi-3.5-vision at the crossing (spec §7.4): re-prefill row j's whole sequence (prompt +
        every generated token) alone with the long factors; overwrite its slots -> new logits."""
        row = self.running[j]
        ids = torch.cat([row.prompt_ids, torch.tensor(row.generated, dtype=torch.long)])
        alone = self.model.new_cache(max_len=ids.numel())
        logits = prefill(self.model, self.model.embed(ids, row.image_embeds), 0, alone)
        self.batch.rewrite_row(j, alone)
        row.long_rope = True
        return logits

    def _leave(self, ids: set[int]) -> None:
        """Rows (by id()) leave the running batch; their KV caches are kept when they asked."""
        keep = []
        for j, row in enumerate(self.running):
            if id(row) in ids:
                if row.retain:
                    row.kv = self.batch.take_row(j)
            else:
                keep.append(j)
        if self._logits is not None:
            self._logits = self._logits[keep] if keep else None
        self.batch.keep(keep)
        self.running = [self.running[j] for j in keep]

    def _fail_running(self, err: BaseException) -> None:
        for row in self.running:
            row.finish_reason, row.error = "error", err
            row.retain = False
            self._finish_timings(row)
        self.running = []
        self.batch = RunningBatch(self.model)
        self._logits = None

    @staticmethod
    def _finish_timings(row: Row) -> None:
        if row._first_token_at is not None:
            row.timings.decode_s = time.perf_counter() - row._first_token_at
            row.timings._decode_tokens = max(0, len(row.generated) - 1)


def run_rows(loop: DecodeLoop, rows: list[Row]) -> Iterator[tuple[Row, str]]:
    """Add rows and step until all of them are done -> every (row, delta) event. Closing the
    iterator cancels the rows still running. A row that failed raises its error here."""
    for row in rows:
        loop.add(row)
    try:
        while any(not r.done for r in rows):
            for row, delta in loop.step():
                if row.finish_reason == "error":
                    raise row.error
                yield row, delta
    finally:
        for row in rows:
            loop.cancel(row)


# -- token-level wrappers (benchmarks, parity and golden tests) -----------------------------------
@dataclass
class GenerationState:
    """A single sequence for generate_ids: prompt, features, and a cache (its first
    `reuse_prefix` slots may already hold the prompt's prefix)."""

    prompt_ids: torch.Tensor  # (L,) int64, image placeholders negative
    image_embeds: list[torch.Tensor]
    cache: KVCache | None
    generated: list[int] = field(default_factory=list)
    long_rope: bool = False
    prefill_s: float = 0.0


def generate_ids(model: Phi3VForCausalLM, state: GenerationState, options: GenerationOptions,
                 stop_ids: frozenset[int], rope_switch: str = "mixed", reuse_prefix: int = 0,
                 logits_hook=None) -> Iterator[int]:
    """Token ids of one sequence (a stop id is yielded last), through a DecodeLoop of one row.
    `logits_hook(step, logits)` sees the logits each token is chosen from."""
    hook = None if logits_hook is None else (lambda _row, step, logits: logits_hook(step, logits))
    loop = DecodeLoop(model, stop_ids, rope_switch, hook)
    row = Row(state.prompt_ids, state.image_embeds, options, cache=state.cache, reuse_prefix=reuse_prefix,
              retain=True)
    for _, _delta in run_rows(loop, [row]):
        state.generated.append(row.generated[-1])
        state.prefill_s, state.long_rope = row.timings.prefill_s, row.long_rope
        yield row.generated[-1]
    state.cache = row.kv
