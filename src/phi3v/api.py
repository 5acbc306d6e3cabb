"""Phi3V: the user-facing model object (see docs/architecture.md for the contract).

    model = phi3v.load("microsoft/Phi-3-vision-128k-instruct")
    print(model.ask("What is in this picture?", images=["photo.jpg"]).text)

Not thread-safe: run one generation at a time per object (the server and batch runner do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import chat as chat_format
from .checkpoint import load_weights, resolve_model_dir
from .config import Phi3VConfig
from .decoder import LongRoPE
from .errors import DeviceError, PromptTooLongError, TooManyImagesError
from .generate import GenerationState, StopMatcher, generate_ids
from .image import ImageBatch, ImageSourcePolicy, open_image, preprocess
from .model import Phi3VForCausalLM
from .options import GenerationOptions
from .results import Completion, Timings, Usage
from .tokenizer import Tokenizer
from .vision import unused_vision_keys

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA device is available (use --device cpu or auto)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError("MPS was requested but is not available on this machine (use --device cpu or auto)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        # bf16 halves memory and is what the checkpoints store; MPS lacks full bf16 support.
        return torch.float32 if device.type == "mps" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise DeviceError(f"unknown dtype {dtype!r} (choose float32 or bfloat16)") from None


@dataclass
class PreparedPrompt:
    """A request turned into model inputs, ready for generate()."""

    input_ids: list[int]  # image k's placeholders are a run of -k
    images: ImageBatch | None
    prompt_text: str
    preprocess_s: float = 0.0

    @property
    def image_tokens(self) -> int:
        return sum(self.images.num_img_tokens) if self.images is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class TextStream:
    """Iterator of text deltas for one generation. `completion` is set when it ends;
    `close()` stops it early (finish_reason "cancelled")."""

    def __init__(self, model: "Phi3V", prepared: PreparedPrompt, options: GenerationOptions):
        self.completion: Completion | None = None
        self._usage = Usage(prompt_tokens=prepared.num_tokens, image_tokens=prepared.image_tokens)
        self._timings = Timings(preprocess_s=prepared.preprocess_s)
        self._ids: list[int] = []
        self._text = ""
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
    def __init__(self, module: Phi3VForCausalLM, cfg: Phi3VConfig, tokenizer: Tokenizer, name: str,
                 model_dir: Path, image_policy: ImageSourcePolicy | None = None, max_context: int | None = None):
        self.module, self.config, self.tokenizer = module, cfg, tokenizer
        self.name, self.model_dir = name, model_dir
        self.image_policy = image_policy or ImageSourcePolicy()
        self.context_length = min(max_context or cfg.text.max_position_embeddings, cfg.text.max_position_embeddings)
        self.stop_ids = frozenset(cfg.stop_token_ids) | tokenizer.stop_ids

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | Path, *, device: str | torch.device = "auto", dtype=None, progress: bool = True,
             revision: str | None = None, image_policy: ImageSourcePolicy | None = None,
             max_context: int | None = None) -> "Phi3V":
        """Load a checkpoint folder or hub id. dtype None = bfloat16 (float32 on MPS)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model_dir = resolve_model_dir(str(model), progress=progress, revision=revision)
        cfg = Phi3VConfig.from_dir(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        with torch.device("meta"):
            module = Phi3VForCausalLM(cfg)
        module.model.rotary = LongRoPE(cfg.text)  # computed, not stored in the checkpoint
        load_weights(module, model_dir, dtype=dt, device=dev, skip_unused=unused_vision_keys(cfg.vision))
        module.model.rotary.to(dev)
        module.eval()
        return cls(module, cfg, tokenizer, str(model), model_dir, image_policy, max_context)

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
        batch = None
        if sources:
            pil = [open_image(s, policy) for s in sources]
            pre = self.config.preprocessor
            batch = preprocess(pil, num_crops or pre.num_crops, pre.image_mean, pre.image_std)
        ids = chat_format.build_input_ids(self.tokenizer, prompt_text, batch.num_img_tokens if batch else [])
        return PreparedPrompt(ids, batch, prompt_text, time.perf_counter() - t0)

    def check_fits(self, prepared: PreparedPrompt, max_new_tokens: int = 1) -> None:
        """Raise PromptTooLongError when the prompt leaves no room for a single new token."""
        n = prepared.num_tokens
        if n + 1 > self.context_length:
            img = prepared.image_tokens
            hint = f" ({img} of them for images: try a smaller num_crops)" if img else ""
            raise PromptTooLongError(
                f"the prompt is {n} tokens{hint}, the model's context is {self.context_length} tokens",
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
        with torch.inference_mode():
            return self.module.model.vision_embed_tokens(pixel_values.to(self.device), image_sizes)

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
        feats = []
        if prepared.images is not None:
            feats = self._encode_images(prepared.images.pixel_values, prepared.images.image_sizes)
        timings.vision_s = time.perf_counter() - t0

        state = GenerationState(torch.tensor(prepared.input_ids, dtype=torch.long), feats, self.module.new_cache())
        decoder = self.tokenizer.incremental()
        matcher = StopMatcher(options.stop)
        raw, emitted, reason = "", 0, "length"
        t_decode = None
        try:
            for token in generate_ids(self.module, state, options, self.stop_ids, self.config.rope_switch):
                if t_decode is None:
                    t_decode = time.perf_counter()
                    timings.prefill_s = state.prefill_s
                    timings.first_token_s = t_decode - t_start
                out._ids.append(token)
                if token in self.stop_ids:
                    reason = "stop"
                    break
                raw += decoder.push(token)
                safe, stopped = matcher.check(raw, emitted)
                if safe > emitted:
                    out._text = raw[:safe]
                    yield raw[emitted:safe]
                    emitted = safe
                if stopped:
                    reason = "stop"
                    break
            else:
                raw += decoder.flush()
                if len(raw) > emitted:  # text held back for a possible stop string that never came
                    out._text = raw
                    yield raw[emitted:]
        finally:
            if t_decode is not None:
                timings.decode_s = time.perf_counter() - t_decode
                timings._decode_tokens = max(0, len(out._ids) - 1)
            state.cache = None  # free the KV cache as soon as the generation ends or is cancelled
        out._finish(reason)
