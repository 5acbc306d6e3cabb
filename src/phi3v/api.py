"""Phi3V: the user-facing model object (see docs/architecture.md for the contract).

    model = phi3v.load("microsoft/Phi-3-vision-128k-instruct")
    print(model.ask("What is in this picture?", images=["photo.jpg"]).text)

Not thread-safe: run one generation at a time per object (the server and batch runner do).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .engine import chat_template as chat_format
from .engine.batched import BatchRow, BatchStream
from .engine.config import Phi3VConfig
from .errors import Phi3VError, PromptTooLongError, TooManyImagesError
from .engine.feature_cache import ImageFeatureCache, decoded_image_key, image_keys
from .engine.generate import GenerationState, TextAssembler, generate_ids
from .engine.image import ImageBatch, ImageSourcePolicy, open_image, preprocess
from .engine.loader import load_engine
from .engine.model import Phi3VForCausalLM
from .options import GenerationOptions
from .kernels.page_out import page_out
from .engine.prefix_cache import RetainedConversation, reusable_prefix
from .results import Completion, Timings, Usage
from .engine.tokenizer import Tokenizer

@dataclass
class PreparedPrompt:
    """A request turned into model inputs, ready for generate()."""

    input_ids: list[int]  # image k's placeholders are a run of -k
    images: ImageBatch | None
    prompt_text: str
    preprocess_s: float = 0.0
    image_keys: list[str] | None = None  # content key per image (feature_cache.image_keys), set on first use

    @property
    def image_tokens(self) -> int:
        return sum(self.images.num_img_tokens) if self.images is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class TextStream:
    """Iterator of text deltas for one generation. `completion` is set when it ends;
    `close()` stops it early (finish_reason "cancelled")."""

    def __init__(self, model: Phi3V, prepared: PreparedPrompt, options: GenerationOptions):
        self.completion: Completion | None = None
        self._usage = Usage(prompt_tokens=prepared.num_tokens, image_tokens=prepared.image_tokens)
        self._timings = Timings(preprocess_s=prepared.preprocess_s)
        self._ids: list[int] = []
        self._text = ""
        self.reused_tokens = 0  # prompt tokens taken from the retained KV cache (not prefilled)
        self._gen = model._run(prepared, options, self)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        if self.completion is None:
            self._finish("cancelled")

    def _finish(self, reason: str) -> None:
        self._usage.completion_tokens = len(self._ids)
        self.completion = Completion(self._text, reason, self._usage, self._timings, list(self._ids))

    def text(self) -> str:
        """Consume the stream and return the whole text."""
        for _ in self:
            pass
        return self.completion.text


class Phi3V:
    # A retained prefix shorter than this is not reused (it would save almost nothing).
    prefix_min_tokens = 16

    def __init__(self, module: Phi3VForCausalLM, cfg: Phi3VConfig, tokenizer: Tokenizer, name: str,
                 model_dir: Path, image_policy: ImageSourcePolicy | None = None, max_context: int | None = None,
                 image_cache_mb: float = 512, prefix_cache: bool = True, low_memory: bool = False):
        self.module, self.config, self.tokenizer = module, cfg, tokenizer
        self.low_memory = bool(low_memory)
        self.name, self.model_dir = name, model_dir
        self.image_policy = image_policy or ImageSourcePolicy()
        self.context_length = min(max_context or cfg.text.max_position_embeddings, cfg.text.max_position_embeddings)
        self.stop_ids = frozenset(cfg.stop_token_ids) | tokenizer.stop_ids
        # Caches (see clear_caches): preprocessed pixels (1/4 of the budget) and projected features
        # (3/4) by image content, and the last conversation's KV cache.
        budget = int(image_cache_mb * 2**20)
        self.pixel_cache = ImageFeatureCache(budget // 4)
        self.image_cache = ImageFeatureCache(budget - budget // 4)
        self.prefix_cache = bool(prefix_cache)
        self._retained: RetainedConversation | None = None
        self._retained_lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | Path, *, device: str | torch.device = "auto", dtype=None, progress: bool = True,
             revision: str | None = None, image_policy: ImageSourcePolicy | None = None,
             max_context: int | None = None, image_cache_mb: float = 512, prefix_cache: bool = True,
             quantize: str | None = None, rope_switch: str | None = None,
             low_memory: bool | None = None, model_dir: str | Path | None = None) -> Phi3V:
        """Load a checkpoint folder or hub id (phi3v.engine.loader). dtype None = bfloat16
        (float32 on MPS); any of phi3v.engine.devices.DTYPES' names.

        rope_switch: what happens when a generation crosses 4096 tokens (spec §7.4): "mixed"
        (Phi-3-vision's reference: keep the cache) or "recompute" (Phi-3.5-vision's reference:
        re-prefill once with the long RoPE factors). None = the reference behaviour of the model.

        image_cache_mb: byte budget of the image caches (preprocessed pixels and features; 0 = off). prefix_cache: keep the
        last conversation's KV cache so a follow-up that extends it prefills only the new tokens.
        quantize: None | "int8" | "int4" (| "int4:GROUP") quantizes the decoder's linear layers while
        loading (phi3v.quant.layers); a checkpoint written by `phi3v quantize` loads quantized as it is.
        low_memory: after each image encoding on the CPU, hand the vision tower's memory-mapped
        weight pages back to the OS (phi3v.kernels.page_out; ~0.58 GiB less resident while the decoder runs,
        re-read from the page cache at the next image). None = on for quantized models.
        model_dir: the folder `model` was already resolved to (the CLI resolves first, to show a
        download's progress); `model` then only names the model (Phi3V.name).
        """
        loaded = load_engine(model, device=device, dtype=dtype, revision=revision, progress=progress,
                             quantize=quantize, rope_switch=rope_switch, model_dir=model_dir)
        if low_memory is None:
            low_memory = getattr(loaded.module, "quantization", None) is not None
        return cls(loaded.module, loaded.config, loaded.tokenizer, str(model), loaded.model_dir, image_policy,
                   max_context, image_cache_mb=image_cache_mb, prefix_cache=prefix_cache, low_memory=low_memory)

    @property
    def device(self) -> torch.device:
        return self.module.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.lm_head.weight.dtype

    @property
    def default_num_crops(self) -> int:
        return self.config.preprocessor.num_crops

    # -- high level -----------------------------------------------------------------------------
    def ask(self, prompt: str, images: Sequence[Any] = (), *, system: str | None = None,
            image_policy: ImageSourcePolicy | None = None, **options) -> Completion:
        opts = GenerationOptions.from_kwargs(**options)
        prepared = self.prepare(prompt=prompt, images=images, system=system, num_crops=opts.num_crops,
                                image_policy=image_policy)
        return self.generate(prepared, opts)

    def chat(self, messages: list[dict], *, image_policy: ImageSourcePolicy | None = None, **options) -> Completion:
        opts = GenerationOptions.from_kwargs(**options)
        prepared = self.prepare(messages=messages, num_crops=opts.num_crops, image_policy=image_policy)
        return self.generate(prepared, opts)

    def stream(self, prompt_or_messages: str | list, images: Sequence[Any] = (), *, system: str | None = None,
               image_policy: ImageSourcePolicy | None = None, **options) -> TextStream:
        opts = GenerationOptions.from_kwargs(**options)
        if isinstance(prompt_or_messages, list):
            prepared = self.prepare(messages=prompt_or_messages, num_crops=opts.num_crops, image_policy=image_policy)
        else:
            prepared = self.prepare(prompt=prompt_or_messages, images=images, system=system,
                                    num_crops=opts.num_crops, image_policy=image_policy)
        return self.generate_stream(prepared, opts)

    # -- lower level ----------------------------------------------------------------------------
    def prepare(self, messages: list[dict] | None = None, prompt: str | None = None, images: Sequence[Any] = (),
                system: str | None = None, num_crops: int | None = None,
                image_policy: ImageSourcePolicy | None = None, max_images: int | None = None,
                raw_prompt: str | None = None) -> PreparedPrompt:
        """Render the prompt, open and preprocess the images, build the input ids.

        Exactly one of: `messages` (OpenAI-style), `prompt` (one user turn; images go first unless
        it has <|image_N|> tags), `raw_prompt` (a fully rendered prompt, used verbatim, e.g.
        "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n").
        """
        t0 = time.perf_counter()
        if messages is not None:
            prompt_text, sources = chat_format.render_messages(messages)
        elif raw_prompt is not None:
            prompt_text, sources = raw_prompt, list(images)
        else:
            sources = list(images)
            prompt_text = chat_format.render_prompt(prompt or "", len(sources), system=system)
        if max_images is not None and len(sources) > max_images:
            raise TooManyImagesError(f"{len(sources)} images given, at most {max_images} allowed")
        chat_format.check_image_tags(prompt_text, len(sources))
        policy = image_policy or self.image_policy
        batch, keys = None, None
        if sources:
            batch, keys = self._preprocess([open_image(s, policy) for s in sources],
                                           num_crops or self.config.preprocessor.num_crops)
        ids = chat_format.build_input_ids(self.tokenizer, prompt_text, batch.num_img_tokens if batch else [])
        return PreparedPrompt(ids, batch, prompt_text, time.perf_counter() - t0, keys)

    def check_fits(self, prepared: PreparedPrompt, max_new_tokens: int = 1) -> None:
        """Raise PromptTooLongError when prompt tokens + max_new_tokens exceed the context.

        The default (1) asks only for room for one new token: that is what generation needs, as it
        caps a larger max_new_tokens at the room left (finish_reason "length"). Callers that promise
        the whole max_new_tokens, such as the server (OpenAI: prompt + max_tokens must fit), pass it.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise Phi3VError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        n = prepared.num_tokens
        if n + max_new_tokens > self.context_length:
            img = prepared.image_tokens
            hint = f" ({img} of them for images: try a smaller num_crops)" if img else ""
            asked = f" and {max_new_tokens} new tokens are asked for" if max_new_tokens > 1 else ""
            raise PromptTooLongError(
                f"the prompt is {n} tokens{hint}{asked}, the model's context is {self.context_length} tokens",
                prompt_tokens=n, image_tokens=img, limit=self.context_length)

    def generate(self, prepared: PreparedPrompt, options: GenerationOptions | None = None) -> Completion:
        stream = self.generate_stream(prepared, options)
        for _ in stream:
            pass
        return stream.completion

    def generate_stream(self, prepared: PreparedPrompt, options: GenerationOptions | None = None) -> TextStream:
        options = options or GenerationOptions()
        self.check_fits(prepared)
        return TextStream(self, prepared, options)

    def generate_batch(self, prepared: Sequence[PreparedPrompt],
                       options: GenerationOptions | Sequence[GenerationOptions] | None = None) -> list[Completion]:
        """Generate for several prompts at once (one batched decoder pass per step) -> one
        Completion per prompt, in order. `options` is shared or one per prompt. Greedy results
        equal running each prompt alone (up to float rounding of the batched matmuls)."""
        stream = self.generate_batch_stream(prepared, options)
        for _ in stream:
            pass
        return list(stream.completions)

    def generate_batch_stream(self, prepared: Sequence[PreparedPrompt],
                              options: GenerationOptions | Sequence[GenerationOptions] | None = None) -> BatchStream:
        """Like generate_batch, as an iterator of (row, text delta); `.completions` at the end."""
        prepared = list(prepared)
        if not prepared:
            raise Phi3VError("generate_batch needs at least one prepared prompt")
        if options is None or isinstance(options, GenerationOptions):
            opts = [options or GenerationOptions()] * len(prepared)
        else:
            opts = list(options)
            if len(opts) != len(prepared):
                raise Phi3VError(f"{len(opts)} GenerationOptions given for {len(prepared)} prompts")
        for p in prepared:
            self.check_fits(p)
        opts = [self._max_new_tokens(p, o) for p, o in zip(prepared, opts)]
        started = [time.perf_counter() - p.preprocess_s for p in prepared]
        timings = [Timings(preprocess_s=p.preprocess_s) for p in prepared]
        usages = [Usage(prompt_tokens=p.num_tokens, image_tokens=p.image_tokens) for p in prepared]

        def make_rows() -> list[BatchRow]:
            t0 = time.perf_counter()
            feats = self._image_features(prepared)  # every row's images, misses in one vision batch
            for t in timings:
                t.vision_s = time.perf_counter() - t0  # shared by the batch
            return [BatchRow(torch.tensor(p.input_ids, dtype=torch.long), f, o)
                    for p, f, o in zip(prepared, feats, opts)]

        return BatchStream(self.module, make_rows, opts, self.tokenizer, self.stop_ids, self.config.rope_switch,
                           usages, timings, started)

    def clear_caches(self) -> None:
        """Free the image caches and the retained conversation's KV cache."""
        self.pixel_cache.clear()
        self.image_cache.clear()
        with self._retained_lock:
            self._retained = None

    @torch.inference_mode()
    def image_embeddings(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Projected image features, one (T_k, hidden) float32 CPU tensor per image."""
        feats = self.module.model.vision_embed_tokens(pixel_values, image_sizes)
        return [f.float().cpu() for f in feats]

    @torch.inference_mode()
    def logits(self, input_ids, pixel_values=None, image_sizes=None, last: int | None = None) -> torch.Tensor:
        """Uncached full forward: float32 logits (L, vocab), or of the last `last` positions."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        feats = self._encode_images(pixel_values, image_sizes) if pixel_values is not None else []
        embeds = self.module.embed(ids, feats)
        positions = torch.arange(ids.numel(), device=self.device)[None]
        hidden = self.module.forward_hidden(embeds[None], positions)[0]
        if last is not None:
            hidden = hidden[-last:]
        return self.module.logits(hidden).cpu()

    # -- internals ------------------------------------------------------------------------------
    def _encode_images(self, pixel_values, image_sizes) -> list[torch.Tensor]:
        vision = self.module.model.vision_embed_tokens
        with torch.inference_mode():
            feats = vision(pixel_values.to(self.device), image_sizes)
        if self.low_memory and self.device.type == "cpu":
            page_out(vision.parameters())
        return feats

    def _preprocess(self, images: list, num_crops: int) -> tuple[ImageBatch, list[str]]:
        """preprocess() with the pixel cache -> (ImageBatch, content key per image). An image whose
        decoded pixels were seen before (same num_crops) reuses its pixel_values and feature key,
        which skips the HD transform and hashing the crops. Cached tensors are shared: read-only."""
        pre = self.config.preprocessor
        entries = []  # (pixel_values (num_crops+1, 3, 336, 336), image_size (2,), tokens, feature key)
        for image in images:
            source_key = decoded_image_key(image, num_crops)
            entry = self.pixel_cache.get(source_key) if self.pixel_cache.max_bytes > 0 else None
            if entry is None:
                one = preprocess([image], num_crops, pre.image_mean, pre.image_std)
                key = image_keys(one.pixel_values, one.image_sizes)[0]
                entry = (one.pixel_values[0], one.image_sizes[0], one.num_img_tokens[0], key)
                pixels = one.pixel_values
                self.pixel_cache.put(source_key, entry, nbytes=pixels.numel() * pixels.element_size())
            entries.append(entry)
        pixel_values = entries[0][0][None] if len(entries) == 1 else torch.stack([e[0] for e in entries])
        batch = ImageBatch(pixel_values, torch.stack([e[1] for e in entries]), [e[2] for e in entries])
        return batch, [e[3] for e in entries]

    def _image_features(self, prepared: list[PreparedPrompt]) -> list[list[torch.Tensor]]:
        """Each prompt's image features (image k at index k-1), from the feature cache where the
        same pixels were seen before; the misses of all prompts go through the vision tower in one
        batch per crop count (an image that repeats is encoded once). Hashing the pixels costs far
        less than encoding them, so content keys are computed even with the cache off."""
        out: list[list] = [[None] * len(p.images.num_img_tokens) if p.images is not None else [] for p in prepared]
        misses: dict[str, list[tuple[int, int]]] = {}  # key -> the (prompt, image) places that need it
        for r, p in enumerate(prepared):
            if p.images is None:
                continue
            if p.image_keys is None:
                p.image_keys = image_keys(p.images.pixel_values, p.images.image_sizes)
            for k in range(len(out[r])):
                key = p.image_keys[k]
                feats = self.image_cache.get(key) if self.image_cache.max_bytes > 0 else None
                if feats is not None:
                    out[r][k] = feats
                else:
                    misses.setdefault(key, []).append((r, k))
        groups: dict[int, list[str]] = {}  # crops per image -> keys (pixel_values stack only then)
        for key, places in misses.items():
            r, k = places[0]
            groups.setdefault(prepared[r].images.pixel_values.shape[1], []).append(key)
        for keys in groups.values():
            first = [misses[key][0] for key in keys]
            pixels = torch.stack([prepared[r].images.pixel_values[k] for r, k in first])
            sizes = torch.stack([prepared[r].images.image_sizes[k] for r, k in first])
            for key, feats in zip(keys, self._encode_images(pixels, sizes)):
                if self.image_cache.max_bytes > 0:
                    self.image_cache.put(key, feats)
                for r, k in misses[key]:
                    out[r][k] = feats
        return out

    def _take_prefix(self, prepared: PreparedPrompt) -> tuple[int, object]:
        """-> (tokens reused, KV cache to generate with): the retained conversation's cache cut to
        the reusable prefix, or a fresh cache. The retained conversation is taken either way."""
        with self._retained_lock:
            retained, self._retained = self._retained, None
        if retained is not None and self.prefix_cache:
            t = self.config.text
            new_long = t.rope_long_factor is not None and prepared.num_tokens > t.original_max_position_embeddings
            reuse = reusable_prefix(retained, prepared.input_ids, prepared.image_keys or [], new_long,
                                    self.prefix_min_tokens)
            if reuse:
                retained.cache.truncate(reuse)
                return reuse, retained.cache
        del retained  # free its memory before a new cache grows
        return 0, self.module.new_cache()

    def _retain(self, prepared: PreparedPrompt, state: GenerationState) -> None:
        """Keep this conversation's KV cache for a follow-up (replaces any earlier one)."""
        if not self.prefix_cache or state.cache is None:
            return
        n = state.cache.length  # prompt + generated tokens fed back (the last one never is)
        ids = (list(prepared.input_ids) + list(state.generated))[:n]
        retained = RetainedConversation(ids, list(prepared.image_keys or []), state.cache, state.long_rope)
        with self._retained_lock:
            self._retained = retained

    def _max_new_tokens(self, prepared: PreparedPrompt, options: GenerationOptions) -> GenerationOptions:
        room = self.context_length - prepared.num_tokens
        if options.max_new_tokens > room:
            return GenerationOptions.from_kwargs(options, max_new_tokens=room)
        return options

    def _run(self, prepared: PreparedPrompt, options: GenerationOptions, out: TextStream) -> Iterator[str]:
        """The body of a TextStream: vision, prefill, decode, detokenize, stop strings."""
        t_start = time.perf_counter() - prepared.preprocess_s
        options = self._max_new_tokens(prepared, options)
        timings = out._timings
        t0 = time.perf_counter()
        feats = self._image_features([prepared])[0]  # hashing + cache lookups + encoding the misses
        timings.vision_s = time.perf_counter() - t0

        reuse, cache = self._take_prefix(prepared)
        out.reused_tokens = reuse
        state = GenerationState(torch.tensor(prepared.input_ids, dtype=torch.long), feats, cache)
        text = TextAssembler(self.tokenizer, self.stop_ids, options.stop)
        t_decode = None
        consistent = False  # the KV cache holds exactly the ids fed so far (not after an error)
        try:
            for token in generate_ids(self.module, state, options, self.stop_ids, self.config.rope_switch,
                                      reuse_prefix=reuse):
                if t_decode is None:
                    t_decode = time.perf_counter()
                    timings.prefill_s = state.prefill_s
                    timings.first_token_s = t_decode - t_start
                out._ids.append(token)
                delta = text.push(token)
                out._text = text.text
                if delta:
                    yield delta
                if text.finish_reason is not None:  # stop id or stop string
                    break
            else:
                delta = text.flush()  # text held back for a possible stop string that never came
                out._text = text.text
                if delta:
                    yield delta
            consistent = True
        except GeneratorExit:  # cancelled at a yield: the cache is still consistent
            consistent = True
            raise
        finally:
            if t_decode is not None:
                timings.decode_s = time.perf_counter() - t_decode
                timings._decode_tokens = max(0, len(out._ids) - 1)
            if consistent:
                self._retain(prepared, state)
            state.cache = None  # otherwise the KV cache is freed as soon as the generation ends
        out._finish(text.finish_reason or "length")
