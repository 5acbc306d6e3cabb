"""Batched generation: several prompts decoded together so each weight read serves every row.

Rows are left-padded to a common length. Each row keeps its own positions (0..len-1 for its real
tokens, so RoPE and the long/short regime are what a single run would use) and a key-padding mask
hides the pad slots. Rows end independently (stop id, stop string, their own max_new_tokens); a
finished row is dropped from the batch (its cache rows are compacted away) so it costs nothing.

`generate_ids_batched` yields (row, token id); `BatchStream` turns that into (row, text delta)
and one Completion per row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .decoder import build_attention_mask
from .generate import Sampler, TextAssembler
from .model import Phi3VForCausalLM
from ..options import GenerationOptions
from ..results import Completion, Timings, Usage


@dataclass
class BatchRow:
    prompt_ids: torch.Tensor  # (L,) int64, image k's placeholders = -k
    image_embeds: list[torch.Tensor]  # image k's features (T_k, hidden) at index k-1
    options: GenerationOptions  # max_new_tokens already fitted to the context


class PaddedBatch:
    """The tensors of a left-padded batch and its KV cache. Row order follows `active`."""

    def __init__(self, model: Phi3VForCausalLM, rows: list[BatchRow]):
        self.model = model
        w = model.lm_head.weight
        lens = [r.prompt_ids.numel() for r in rows]
        B, width = len(rows), max(lens)
        hidden = model.cfg.text.hidden_size
        self.embeds = torch.zeros(B, width, hidden, dtype=w.dtype, device=w.device)  # pads stay 0
        self.positions = torch.zeros(B, width, dtype=torch.long, device=w.device)
        key_valid = torch.zeros(B, width, dtype=torch.bool, device=w.device)
        with torch.inference_mode():
            for i, (row, n) in enumerate(zip(rows, lens)):
                self.embeds[i, width - n:] = model.embed(row.prompt_ids, row.image_embeds)
                self.positions[i, width - n:] = torch.arange(n, device=w.device)
                key_valid[i, width - n:] = True
        # (B, slots) False at pad slots; None while no active row has padding (plain causal is exact).
        self.key_valid = None if bool(key_valid.all()) else key_valid
        self.next_pos = torch.tensor(lens, dtype=torch.long, device=w.device)  # position of each row's next token
        steps = max(r.options.max_new_tokens for r in rows)
        self.cache = model.new_cache(batch=B, max_len=width + steps)
        self.active = list(range(B))  # original row index of each batch row

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """-> (B, vocab) float32 logits of each row's last prompt position."""
        width = self.embeds.shape[1]
        mask = build_attention_mask(width, 0, self.key_valid, self.embeds.device)
        h = self.model.forward_hidden(self.embeds, self.positions, self.cache, mask)
        self.embeds = self.positions = None  # only needed once
        return self.model.logits(h[:, -1])

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per active row (in `active` order) -> (B, vocab) float32 logits."""
        dev = self.next_pos.device
        embeds = self.model.model.embed_tokens(torch.tensor(tokens, device=dev))[:, None]  # (B, 1, hidden)
        if self.key_valid is not None:
            new = torch.ones(len(tokens), 1, dtype=torch.bool, device=dev)
            self.key_valid = torch.cat([self.key_valid, new], dim=1)
        mask = build_attention_mask(1, self.cache.length, self.key_valid, dev)
        h = self.model.forward_hidden(embeds, self.next_pos[:, None], self.cache, mask)
        self.next_pos += 1
        return self.model.logits(h[:, -1])

    def keep(self, rows: list[int]) -> None:
        """Keep only these original rows (a subset of `active`, same order): compact the cache."""
        if rows == self.active:
            return
        idx = torch.tensor([self.active.index(r) for r in rows], device=self.next_pos.device)
        c = self.cache
        for layer in range(len(c.k)):  # one layer at a time: peak memory = cache + one layer
            c.k[layer] = c.k[layer].index_select(0, idx)
            c.v[layer] = c.v[layer].index_select(0, idx)
        c.batch = len(rows)
        self.next_pos = self.next_pos.index_select(0, idx)
        if self.key_valid is not None:
            kv = self.key_valid.index_select(0, idx)
            self.key_valid = None if bool(kv.all()) else kv
        self.active = list(rows)

    @torch.inference_mode()
    def recompute_row(self, row: int, ids: torch.Tensor, image_embeds: list[torch.Tensor]) -> torch.Tensor:
        """Phi-3.5-vision's switch to long RoPE (spec §7.4) for one row: re-prefill its whole
        sequence `ids` (prompt + every generated token, the last one just fed by step()) alone,
        with the long factors, and overwrite its cache slots. -> that row's new logits (vocab,)."""
        j, n, c = self.active.index(row), ids.numel(), self.cache
        start = c.length - n  # the row's real tokens end at the last filled slot
        single = self.model.new_cache(batch=1, max_len=n)
        embeds = self.model.embed(ids, image_embeds)[None]
        positions = torch.arange(n, device=embeds.device)[None]
        h = self.model.forward_hidden(embeds, positions, single, None)
        for layer in range(len(c.k)):
            c.k[layer][j, :, start:c.length] = single.k[layer][0, :, :n]
            c.v[layer][j, :, start:c.length] = single.v[layer][0, :, :n]
        return self.model.logits(h[0, -1])


def generate_ids_batched(model: Phi3VForCausalLM, rows: list[BatchRow], stop_ids: frozenset[int],
                         rope_switch: str = "mixed", stopped: set[int] | None = None,
                         timings: dict | None = None, logits_hook=None) -> Iterator[tuple[int, int]]:
    """Yield (row, token id) for every generated token, rows interleaved step by step.

    A row ends after its stop id, its max_new_tokens, or when the consumer adds its index to
    `stopped` (e.g. a stop string) right after receiving one of its tokens. `timings["prefill_s"]`
    is set once the batch prefill is done. `rope_switch` as in generate.generate_ids: under
    "recompute" a row whose sequence grows past original_max_position_embeddings is re-prefilled
    with the long factors, exactly as when it runs alone. `logits_hook(row, step, logits)` sees
    the float32 logits each token is chosen from (for tests).
    """
    stopped = stopped if stopped is not None else set()
    device = model.lm_head.weight.device
    samplers = [Sampler(r.options, device) for r in rows]
    generated: list[list[int]] = [[] for _ in rows]
    text_ids = [r.prompt_ids[r.prompt_ids >= 0] for r in rows]  # for the repetition penalty
    orig = model.cfg.text.original_max_position_embeddings
    has_long = model.cfg.text.rope_long_factor is not None
    long_rope = [has_long and r.prompt_ids.numel() > orig for r in rows]

    t0 = time.perf_counter()
    batch = PaddedBatch(model, rows)
    logits = batch.prefill()
    if timings is not None:
        timings["prefill_s"] = time.perf_counter() - t0

    while batch.active:
        going, tokens = [], []
        for j, row in enumerate(list(batch.active)):
            opts = rows[row].options
            seen = None
            if opts.repetition_penalty != 1.0:
                seen = torch.cat([text_ids[row], torch.tensor(generated[row], dtype=torch.long)])
            if logits_hook is not None:
                logits_hook(row, len(generated[row]), logits[j])
            token = samplers[row](logits[j], seen)
            generated[row].append(token)
            yield row, token
            if token in stop_ids or len(generated[row]) >= opts.max_new_tokens or row in stopped:
                continue
            going.append(row)
            tokens.append(token)
        if not going:
            return
        batch.keep(going)
        logits = batch.step(tokens)
        for j, row in enumerate(going):
            if rope_switch == "recompute" and has_long and not long_rope[row] \
                    and rows[row].prompt_ids.numel() + len(generated[row]) > orig:
                ids = torch.cat([rows[row].prompt_ids, torch.tensor(generated[row], dtype=torch.long)])
                with torch.inference_mode():  # logits is an inference tensor
                    logits[j] = batch.recompute_row(row, ids, rows[row].image_embeds)
                long_rope[row] = True


class BatchStream:
    """Iterator of (row, text delta) over a batch; `completions` (one per row, in order) once it is
    exhausted; close() ends the rows still running with finish_reason "cancelled"."""

    def __init__(self, module: Phi3VForCausalLM, make_rows: Callable[[], list[BatchRow]],
                 options: list[GenerationOptions], tokenizer, stop_ids: frozenset[int], rope_switch: str,
                 usages: list[Usage], timings: list[Timings], started: list[float]):
        """make_rows() runs when iteration starts (the vision work happens then, not at creation)."""
        self.completions: list[Completion | None] = [None] * len(options)
        self._options, self._usages, self._timings, self._started = options, usages, timings, started
        self._texts = [TextAssembler(tokenizer, stop_ids, o.stop) for o in options]
        self._first: list[float | None] = [None] * len(options)
        self._gen = self._run(module, make_rows, stop_ids, rope_switch)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        for row in range(len(self._options)):
            if self.completions[row] is None:
                self._finish(row, "cancelled")

    def _finish(self, row: int, reason: str) -> None:
        text, t = self._texts[row], self._timings[row]
        if self._first[row] is not None:
            t.decode_s = time.perf_counter() - self._first[row]
            t._decode_tokens = max(0, len(text.ids) - 1)
        usage = self._usages[row]
        usage.completion_tokens = len(text.ids)
        self.completions[row] = Completion(text.text, reason, usage, t, list(text.ids))

    def text(self) -> list[str]:
        """Consume the stream and return each row's text."""
        for _ in self:
            pass
        return [c.text for c in self.completions]

    def _run(self, module: Phi3VForCausalLM, make_rows, stop_ids: frozenset[int],
             rope_switch: str) -> Iterator[tuple[int, str]]:
        rows = make_rows()
        stopped: set[int] = set()
        shared: dict = {}
        for row, token in generate_ids_batched(module, rows, stop_ids, rope_switch, stopped, shared):
            text, t = self._texts[row], self._timings[row]
            if self._first[row] is None:
                self._first[row] = time.perf_counter()
                t.prefill_s = shared.get("prefill_s", 0.0)
                t.first_token_s = self._first[row] - self._started[row]
            delta = text.push(token)
            if text.finish_reason is not None:  # stop id or stop string: the loop drops the row
                stopped.add(row)
                self._finish(row, text.finish_reason)
            elif len(text.ids) >= rows[row].options.max_new_tokens:
                delta += text.flush()
                self._finish(row, "length")
            if delta:
                yield row, delta
