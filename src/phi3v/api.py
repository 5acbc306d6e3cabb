"""Phi3V: the user-facing model object (see docs/architecture.md for the contract).

    model = phi3v.load("microsoft/Phi-3-vision-128k-instruct")
    print(model.ask("What is in this picture?", images=["photo.jpg"]).text)

Not thread-safe: run one generation at a time per object (the server and batch runner do).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .engine import chat_template as chat_format
from .engine.config import Phi3VConfig
from .errors import Phi3VError, PromptError, PromptTooLongError, TooManyImagesError
from .engine.constraints import Grammars, OutputFormat, parse_output
from .engine.generate import DecodeLoop, Row
from .engine.image_features import ImageFeatures
from .engine.vision import DEFAULT_VISION_CHUNK
from .engine.image import ImageSourcePolicy, open_images
from .engine.loader import load_engine
from .engine.model import Phi3VForCausalLM
from .options import GenerationOptions
from .engine.prefix_cache import ConversationCache
from .engine.prompt import PreparedPrompt
from .engine.streams import BatchStream, TextStream, cancelled_completion
from .engine.text import TextAssembler
from .engine.frame_select import VIDEO_NUM_CROPS, FrameSelection
from .engine.video_input import RequestVideos, has_video_parts, labelled_prompt
from .engine.video_plan import check_video_fits
from .results import Completion, Timings
from .engine.tokenizer import Tokenizer

class Phi3V:
    # A retained prefix shorter than this is not reused (it would save almost nothing).
    prefix_min_tokens = 16

    def __init__(self, module: Phi3VForCausalLM, cfg: Phi3VConfig, tokenizer: Tokenizer, name: str,
                 model_dir: Path, image_policy: ImageSourcePolicy | None = None, max_context: int | None = None,
                 image_cache_mb: float = 512, prefix_cache: bool = True, low_memory: bool = False):
        self.module, self.config, self.tokenizer = module, cfg, tokenizer
        self.name, self.model_dir = name, model_dir
        self.image_policy = image_policy or ImageSourcePolicy()
        self.context_length = min(max_context or cfg.text.max_position_embeddings, cfg.text.max_position_embeddings)
        self.stop_ids = frozenset(cfg.stop_token_ids) | tokenizer.stop_ids
        # Caches (see clear_caches): pixels and features by image content, the last conversation's KV.
        self.images = ImageFeatures(module, cfg.preprocessor, image_cache_mb, low_memory)
        self.conversation = ConversationCache(cfg.text, prefix_cache, self.prefix_min_tokens)
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | Path, *, device: str | torch.device = "auto", dtype=None, progress: bool = True,
             revision: str | None = None, image_policy: ImageSourcePolicy | None = None,
             max_context: int | None = None, image_cache_mb: float = 512, prefix_cache: bool = True,
             quantize: str | None = None, rope_switch: str | None = None,
             low_memory: bool | None = None, model_dir: str | Path | None = None,
             vision_chunk: int | None = DEFAULT_VISION_CHUNK) -> Phi3V:
        """Load a checkpoint folder or hub id (phi3v.engine.loader). dtype None = bfloat16
        (float32 on MPS); any of phi3v.engine.devices.DTYPES' names.

        rope_switch: what happens when a generation crosses 4096 tokens (spec §7.4): "mixed"
        (Phi-3-vision's reference: keep the cache) or "recompute" (Phi-3.5-vision's reference:
        re-prefill once with the long RoPE factors). None = the reference behaviour of the model.

        image_cache_mb: byte budget of the image caches (preprocessed pixels and features; 0 = off). prefix_cache: keep the
        last conversation's KV cache so a follow-up that extends it prefills only the new tokens.
        quantize: None | "int8" | "int4" (| "int4:GROUP") quantizes the decoder's linear layers while
        loading (phi3v.quant.layers); a checkpoint written by `phi3v quantize` loads quantized as it is.
        "w8a8" (opt-in, never a default): int8 weights for the decoder and the CLIP tower, and int8
        activations (per token, at run time) for calls of 9+ rows, prefill and vision (quant.w8a8_layer).
        low_memory: after each image encoding on the CPU, hand the vision tower's memory-mapped
        weight pages back to the OS (phi3v.kernels.page_out; ~0.58 GiB less resident while the decoder runs,
        re-read from the page cache at the next image). None = on for quantized models.
        model_dir: the folder `model` was already resolved to (the CLI resolves first, to show a
        download's progress); `model` then only names the model (Phi3V.name).
        vision_chunk: image crops per vision-tower call (None or 0: all of a request's crops in one
        call); smaller pieces bound the tower's activation memory, and are what a server encodes
        between two decode steps of the requests already running (model.images.vision_chunk).
        """
        loaded = load_engine(model, device=device, dtype=dtype, revision=revision, progress=progress,
                             quantize=quantize, rope_switch=rope_switch, model_dir=model_dir)
        if low_memory is None:
            low_memory = getattr(loaded.module, "quantization", None) is not None
        made = cls(loaded.module, loaded.config, loaded.tokenizer, str(model), loaded.model_dir, image_policy,
                   max_context, image_cache_mb=image_cache_mb, prefix_cache=prefix_cache, low_memory=low_memory)
        made.images.vision_chunk = vision_chunk
        return made

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
    # Structured output (ask, chat, stream): json_schema= a dict, a JSON string, a pydantic model class
    # (then reply.parsed is its instance) or "json_object" (any JSON object); regex= a pattern;
    # choices= a list of strings. The answer follows it token by token (engine/constraints.py).
    #
    # Video (docs/video.md): video= a file, an animated GIF/WebP, a folder of frames or a data: URI,
    # its frames chosen by frames= N or fps= F within [start, end) seconds (engine/frame_select.py),
    # num_crops 4 unless given; time_labels=True adds "frame k at MM:SS" lines before the question.
    # In messages: {"type": "video_url", "video_url": {"url": ...}} or {"type": "video", "video": ...}.
    def ask(self, prompt: str, images: Sequence[Any] = (), *, system: str | None = None,
            image_policy: ImageSourcePolicy | None = None, json_schema: Any = None, regex: str | None = None,
            choices: Sequence[str] | None = None, video: Any = None, frames: int | None = None,
            fps: float | None = None, start: float | None = None, end: float | None = None,
            time_labels: bool = False, **options) -> Completion:
        opts = GenerationOptions.from_kwargs(**options)
        fmt = OutputFormat.from_options(json_schema, regex, choices)
        prepared = self.prepare(prompt=prompt, images=_image_list(images), system=system, num_crops=opts.num_crops,
                                image_policy=image_policy, video=video,
                                video_selection=FrameSelection(frames, fps, start, end, time_labels))
        return self.generate(prepared, opts, output_format=fmt, parse_as=_model_class(json_schema))

    def chat(self, messages: list[dict], *, image_policy: ImageSourcePolicy | None = None, json_schema: Any = None,
             regex: str | None = None, choices: Sequence[str] | None = None, frames: int | None = None,
             fps: float | None = None, start: float | None = None, end: float | None = None,
             time_labels: bool = False, **options) -> Completion:
        """frames / fps / start / end / time_labels: the default selection of the messages' video parts."""
        opts = GenerationOptions.from_kwargs(**options)
        fmt = OutputFormat.from_options(json_schema, regex, choices)
        prepared = self.prepare(messages=messages, num_crops=opts.num_crops, image_policy=image_policy,
                                video_selection=FrameSelection(frames, fps, start, end, time_labels))
        return self.generate(prepared, opts, output_format=fmt, parse_as=_model_class(json_schema))

    def stream(self, prompt_or_messages: str | list, images: Sequence[Any] = (), *, system: str | None = None,
               image_policy: ImageSourcePolicy | None = None, json_schema: Any = None, regex: str | None = None,
               choices: Sequence[str] | None = None, video: Any = None, frames: int | None = None,
               fps: float | None = None, start: float | None = None, end: float | None = None,
               time_labels: bool = False, **options) -> TextStream:
        opts = GenerationOptions.from_kwargs(**options)
        fmt = OutputFormat.from_options(json_schema, regex, choices)
        selection = FrameSelection(frames, fps, start, end, time_labels)
        if isinstance(prompt_or_messages, list):
            prepared = self.prepare(messages=prompt_or_messages, num_crops=opts.num_crops, image_policy=image_policy,
                                    video_selection=selection)
        else:
            prepared = self.prepare(prompt=prompt_or_messages, images=_image_list(images), system=system,
                                    num_crops=opts.num_crops, image_policy=image_policy, video=video,
                                    video_selection=selection)
        return self.generate_stream(prepared, opts, output_format=fmt, parse_as=_model_class(json_schema))

    # -- lower level ----------------------------------------------------------------------------
    def prepare(self, messages: list[dict] | None = None, prompt: str | None = None, images: Sequence[Any] = (),
                system: str | None = None, num_crops: int | None = None,
                image_policy: ImageSourcePolicy | None = None, max_images: int | None = None,
                raw_prompt: str | None = None, special_tokens_in_text: bool = False, video: Any = None,
                video_selection: FrameSelection | None = None) -> PreparedPrompt:
        """Render the prompt, open and preprocess the images, build the input ids.

        Exactly one of: `messages` (OpenAI-style), `prompt` (one user turn; images go first unless
        it has <|image_N|> tags), `raw_prompt` (a fully rendered prompt, used verbatim, e.g.
        "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n").

        The text of `messages`, `prompt` and `system` is plain text: special tokens spelled in it
        (`<|end|>`, `<|assistant|>`, ...) are encoded as characters, so text from a user cannot
        end a turn or start another role's. `<|image_N|>` tags still work (they are placeholders,
        not tokens). special_tokens_in_text=True honours them as tokens, as the reference processor
        does; `raw_prompt` is always encoded as written.

        video (with `prompt` or `raw_prompt`; after `images`) and the video parts of `messages`:
        their frames (video_selection) become images, num_crops 4 unless given for the whole
        prompt; a prompt that cannot fit the context is refused before any frame is decoded.
        """
        t0 = time.perf_counter()
        policy = image_policy or self.image_policy
        videos = None
        if video is not None or (messages is not None and has_video_parts(messages)):
            num_crops = num_crops or VIDEO_NUM_CROPS  # the model card's multi-frame setting
            videos = RequestVideos(policy, num_crops, self.context_length)
        try:
            prepared = self._prepare(t0, policy, videos, video, video_selection, messages, prompt, images, system,
                                     num_crops, max_images, raw_prompt, special_tokens_in_text)
            if videos is not None:
                prepared.video_plans = tuple(videos.plans)  # which frames were used (server, batch, --json)
            return prepared
        finally:
            if videos is not None:
                videos.close()

    def _prepare(self, t0, policy, videos, video, selection, messages, prompt, images, system, num_crops,
                 max_images, raw_prompt, special_tokens_in_text) -> PreparedPrompt:
        plain_spans: tuple = ()
        if messages is not None:
            if video is not None:
                raise PromptError("video= goes with a prompt; in messages give a video part "
                                  "({'type': 'video_url', 'video_url': {'url': ...}})")
            if videos is not None:
                messages = videos.expand_messages(messages, selection)
            prompt_text, sources, plain_spans = chat_format.render_chat(messages)
        else:
            sources = list(images)
            if video is not None:
                sources += videos.add(video, selection)
                if selection is not None and selection.time_labels and raw_prompt is None:
                    prompt = labelled_prompt(prompt or "", videos.plans[-1])
            if raw_prompt is not None:
                prompt_text = raw_prompt
            else:
                prompt_text, _, plain_spans = chat_format.render_prompt_chat(prompt or "", len(sources), system=system)
        if special_tokens_in_text:
            plain_spans = ()
        if max_images is not None and len(sources) > max_images:
            raise TooManyImagesError(f"{len(sources)} images given, at most {max_images} allowed")
        chat_format.check_image_tags(prompt_text, len(sources))
        batch, keys = None, None
        if sources:
            crops = num_crops or self.config.preprocessor.num_crops
            if videos is not None:  # the planned tokens (images count 1 here: a lower bound) against the context
                planned = chat_format.build_input_ids(self.tokenizer, prompt_text, videos.planned_tokens(sources),
                                                      plain_spans)
                check_video_fits(videos.plans, len(planned), self.context_length)
                media = videos.open_media(sources, policy, crops)
            else:  # every header checked against the pixel budgets first, then one image decoded at a time
                media = open_images(sources, policy, crops)
            batch, keys = self.images.preprocess(media, crops)
        ids = chat_format.build_input_ids(self.tokenizer, prompt_text, batch.num_img_tokens if batch else [],
                                          plain_spans)
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

    def generate(self, prepared: PreparedPrompt, options: GenerationOptions | None = None, *,
                 output_format: OutputFormat | None = None, parse_as: type | None = None) -> Completion:
        stream = self.generate_stream(prepared, options, output_format=output_format, parse_as=parse_as)
        for _ in stream:
            pass
        return stream.completion

    def generate_stream(self, prepared: PreparedPrompt, options: GenerationOptions | None = None, *,
                        output_format: OutputFormat | None = None, parse_as: type | None = None) -> TextStream:
        options = self._fit(prepared, options or GenerationOptions())
        self.check_fits(prepared)
        if output_format is not None:
            self.grammars.check(output_format)  # an unusable schema fails here, before any work

        def make_row() -> Row:
            return self.start_row(prepared, options, reuse_conversation=True, output_format=output_format,
                                  parse_as=parse_as)

        return TextStream(self.new_loop(), make_row, lambda row: self.end_row(prepared, row),
                          self._not_started(prepared))

    def generate_batch(self, prepared: Sequence[PreparedPrompt],
                       options: GenerationOptions | Sequence[GenerationOptions] | None = None, *,
                       output_formats: Sequence[OutputFormat | None] | None = None) -> list[Completion]:
        """Generate for several prompts at once (one batched decoder pass per step) -> one
        Completion per prompt, in order. `options` is shared or one per prompt. Greedy results
        equal running each prompt alone (up to float rounding of the batched matmuls)."""
        stream = self.generate_batch_stream(prepared, options, output_formats=output_formats)
        for _ in stream:
            pass
        return list(stream.completions)

    def generate_batch_stream(self, prepared: Sequence[PreparedPrompt],
                              options: GenerationOptions | Sequence[GenerationOptions] | None = None, *,
                              output_formats: Sequence[OutputFormat | None] | None = None) -> BatchStream:
        """Like generate_batch, as an iterator of (index, text delta); `.completions` at the end.
        output_formats: one per prompt (None = unconstrained): rows with different constraints,
        or none, decode together."""
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
        opts = [self._fit(p, o) for p, o in zip(prepared, opts)]
        formats = list(output_formats) if output_formats is not None else [None] * len(prepared)
        if len(formats) != len(prepared):
            raise Phi3VError(f"{len(formats)} output formats given for {len(prepared)} prompts")
        for fmt in formats:
            if fmt is not None:
                self.grammars.check(fmt)
        started = [time.perf_counter() - p.preprocess_s for p in prepared]

        def make_rows() -> list[Row]:  # on the first next(): every prompt's images in one vision batch
            t0 = time.perf_counter()
            feats = self.images.for_prompts(prepared)
            rows = [self._row(p, o, f, t) for p, o, f, t in zip(prepared, opts, feats, started)]
            for row, fmt in zip(rows, formats):
                row.timings.vision_s = time.perf_counter() - t0  # shared by the batch
                if fmt is not None:
                    row.constraint = self.grammars.start(fmt)
                    row.parse = partial(parse_output, fmt, None)
            return rows

        return BatchStream(self.new_loop(), make_rows, [self._not_started(p) for p in prepared])

    def new_loop(self, logits_hook=None, prefill_chunk: int | None = None,
                 vision_chunk: int | None = None, vision_layers: int | None = None,
                 fuse_prefill: bool = True, step_budget: float | None = None) -> DecodeLoop:
        """A generation loop on this model (rows can join and leave between its steps). While
        rows are running, a newcomer prefills at most prefill_chunk prompt tokens per step (None:
        whole prompts) and encodes at most vision_chunk image crops per step (None: the model's
        vision_chunk; 0: all at once) through at most vision_layers of the tower's layers (None:
        all); with none running, whole prompts and the model's pieces. fuse_prefill: the
        newcomer's prefill chunk shares the running rows' decoder pass (False: a pass of its own).
        step_budget: a step with newcomer work may take about this many times the fastest plain
        decode step, the pieces sized from measured times, prefill_chunk and one vision piece the
        smallest (engine/step_budget.py; None: fixed pieces)."""
        return DecodeLoop(self.module, self.stop_ids, self.config.rope_switch, logits_hook, prefill_chunk,
                          vision_chunk, vision_layers, fuse_prefill, step_budget)

    def start_row(self, prepared: PreparedPrompt, options: GenerationOptions | None = None, *,
                  reuse_conversation: bool = False, output_format: OutputFormat | None = None,
                  parse_as: type | None = None) -> Row:
        """A Row ready to add to a new_loop() loop: options fitted to the context, image features
        from the caches, or a FeatureJob (row.features) that the loop runs a piece at a time (at
        most vision_chunk crops per step, so others keep decoding), text assembly with the stop
        rules. reuse_conversation: start from the retained conversation's KV prefix when it
        matches, and keep this row's cache when it ends (call end_row then)."""
        options = self._fit(prepared, options or GenerationOptions())
        self.check_fits(prepared)
        row = self._row(prepared, options, [], time.perf_counter() - prepared.preprocess_s)
        t0 = time.perf_counter()
        job = self.images.start([prepared])  # content keys now (the retained conversation is found by them)
        if job.done:
            row.image_embeds = job.features[0]
        else:
            row.features = job
        row.timings.vision_s = time.perf_counter() - t0
        if output_format is not None:
            row.constraint = self.grammars.start(output_format)
            row.parse = partial(parse_output, output_format, parse_as)
        if reuse_conversation:
            row.reuse_prefix, row.cache = self.conversation.take(prepared.input_ids, prepared.image_keys or [])
            row.retain = self.conversation.enabled
        return row

    @property
    def grammars(self) -> Grammars:
        """Output formats compiled against this model's tokenizer (made on first use)."""
        with self._grammars_lock:  # the server's preparation threads may ask at the same time
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.config.text.vocab_size)
        return self._grammars

    def end_row(self, prepared: PreparedPrompt, row: Row) -> None:
        """After a start_row(reuse_conversation=True) row is done: retain its KV cache (if kept)."""
        if row.kv is not None:
            self.conversation.keep(prepared.input_ids, prepared.image_keys or [], row.generated, row.kv,
                                   row.long_rope)
            row.kv = None

    def clear_caches(self) -> None:
        """Free the image caches and the retained conversation's KV cache."""
        self.images.clear()
        self.conversation.clear()

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
    def _row(self, prepared: PreparedPrompt, options: GenerationOptions, feats: list, started: float) -> Row:
        return Row(torch.tensor(prepared.input_ids, dtype=torch.long), feats, options,
                   text=TextAssembler(self.tokenizer, self.stop_ids, options.stop),
                   timings=Timings(preprocess_s=prepared.preprocess_s), started=started)

    def _fit(self, prepared: PreparedPrompt, options: GenerationOptions) -> GenerationOptions:
        """max_new_tokens cut to the room the context leaves (the answer then ends "length")."""
        room = self.context_length - prepared.num_tokens
        if options.max_new_tokens > room >= 1:
            return GenerationOptions.from_kwargs(options, max_new_tokens=room)
        return options

    @staticmethod
    def _not_started(prepared: PreparedPrompt) -> Completion:
        return cancelled_completion(prepared.num_tokens, prepared.image_tokens, prepared.preprocess_s)

    # Names kept for callers and tests that reach into the caches.
    @property
    def low_memory(self) -> bool:
        return self.images.low_memory

    @property
    def pixel_cache(self):
        return self.images.pixel_cache

    @property
    def image_cache(self):
        return self.images.feature_cache

    @property
    def _retained(self):
        return self.conversation.retained

    def _image_features(self, prepared: list[PreparedPrompt]) -> list[list[torch.Tensor]]:
        return self.images.for_prompts(prepared)

    def _encode_images(self, pixel_values, image_sizes) -> list[torch.Tensor]:
        return self.images.encode(pixel_values, image_sizes)


def _model_class(json_schema: Any) -> type | None:
    """A pydantic model class given as json_schema (reply.parsed becomes its instance)."""
    return json_schema if isinstance(json_schema, type) and hasattr(json_schema, "model_validate") else None


def _image_list(images: Any) -> list:
    """`images` as a list: one image given on its own (a path, bytes, PIL image) is one image,
    not a sequence of characters or bytes."""
    if images is None:
        return []
    if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
        return [images]
    return list(images)
