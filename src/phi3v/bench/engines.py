"""The two engines the benchmark compares, behind one small interface.

    load()                                   build the model (timed by the worker)
    encode_crops(crops)                      vision tower on (N, 3, 336, 336) crops
    first_token(messages, num_crops) -> s    request -> first generated token, nothing cached
    followup_first_token(turn1, q2, nc, answer_tokens) -> s   second question in the same chat
    prefill(ids)                             uncached forward of a text prompt (KV cache filled)
    decode_times(prompt_ids, n, context)     per-token timestamps of n greedy tokens; with
                                             context > 0 the KV cache first holds `context` random
                                             keys/values (decode cost depends only on its length)

Both engines use phi3v's image preprocessing and prompt rendering (the transformers side has no
Phi-3-vision processor without remote code, and it is the same work); what differs is the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..engine.devices import parse_dtype
from ..options import GenerationOptions

_NO_STOP = frozenset({-1})  # no token id is negative: generation always runs n tokens


class PhiEngine:
    """phi3v's own engine (any dtype / quantization)."""

    def __init__(self, model_dir: Path, dtype: str, quantize: str | None = None):
        self.model_dir, self.dtype, self.quantize = Path(model_dir), dtype, quantize
        self.model = None

    def load(self) -> None:
        import phi3v

        self.model = phi3v.load(str(self.model_dir), device="cpu", dtype=self.dtype, progress=False,
                                quantize=self.quantize)

    @property
    def module(self):
        return self.model.module

    @torch.inference_mode()
    def encode_crops(self, crops: torch.Tensor) -> None:
        self.module.model.vision_embed_tokens.encode_crops(crops.to(self.model.dtype))

    def first_token(self, messages: list[dict], num_crops: int) -> float:
        self.model.clear_caches()
        start = time.perf_counter()
        self.model.chat(messages, max_new_tokens=1, num_crops=num_crops)
        return time.perf_counter() - start

    def followup_first_token(self, turn1: list[dict], question: str, num_crops: int, answer_tokens: int) -> float:
        self.model.clear_caches()
        answer = self.model.chat(turn1, max_new_tokens=answer_tokens, num_crops=num_crops).text
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
        start = time.perf_counter()
        self.model.chat(turn2, max_new_tokens=1, num_crops=num_crops)
        return time.perf_counter() - start

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        from ..engine.generate import prefill

        cache = self.module.new_cache()
        prefill(self.module, self.module.embed(torch.tensor(ids)), 0, cache)

    @torch.inference_mode()
    def decode_times(self, prompt_ids: list[int], n: int, context: int = 0) -> list[float]:
        from ..engine.generate import GenerationState, generate_ids

        cache = self.module.new_cache()
        if context:
            cache.reserve(context + len(prompt_ids) + n)
            gen = torch.Generator().manual_seed(0)
            for layer in range(len(cache.k)):
                for buf in (cache.k[layer], cache.v[layer]):
                    buf[:, :, :context] = torch.randn(buf[:, :, :context].shape, generator=gen).to(buf.dtype)
            cache.length = context
        ids = torch.cat([torch.zeros(context, dtype=torch.long), torch.tensor(prompt_ids)])
        state = GenerationState(ids, [], cache)
        times = []
        for _ in generate_ids(self.module, state, GenerationOptions(max_new_tokens=n), _NO_STOP,
                              reuse_prefix=context):
            times.append(time.perf_counter())
        return times


class TransformersEngine:
    """transformers' Phi3ForCausalLM (SDPA) + CLIPVisionModel on the checkpoint's own tensors, with
    the Phi-3-vision glue (2x2 merge, separators, projector) written in plain torch."""

    CLIP = "model.vision_embed_tokens.img_processor.vision_model."
    VISION = "model.vision_embed_tokens."

    def __init__(self, model_dir: Path, dtype: str = "bfloat16"):
        self.model_dir = Path(model_dir)
        self.dtype = parse_dtype(dtype)
        self.lm = self.clip = self.glue = None

    def load(self) -> None:
        import transformers
        from safetensors import safe_open

        from ..engine.weights import checkpoint_files
        from ..engine.config import Phi3VConfig
        from ..engine.tokenizer import Tokenizer

        cfg = Phi3VConfig.from_dir(self.model_dir)
        raw = cfg.raw
        self.cfg, self.tokenizer = cfg, Tokenizer.from_dir(self.model_dir)
        files = checkpoint_files(self.model_dir)
        handles = {f: safe_open(str(f), framework="pt") for f in set(files.values())}
        # Memory-mapped tensors, cast only if the checkpoint is not already in the target dtype.
        tensors = {name: handles[f].get_tensor(name).to(self.dtype) for name, f in files.items()}

        rope = raw["rope_scaling"]
        lm_cfg = transformers.Phi3Config(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"], hidden_act=raw["hidden_act"],
            rms_norm_eps=raw["rms_norm_eps"], max_position_embeddings=raw["max_position_embeddings"],
            original_max_position_embeddings=raw["original_max_position_embeddings"],
            rope_scaling={"rope_type": "longrope", "short_factor": rope["short_factor"],
                          "long_factor": rope["long_factor"], "rope_theta": raw["rope_theta"]},
            sliding_window=raw.get("sliding_window"), bos_token_id=raw["bos_token_id"],
            eos_token_id=raw["eos_token_id"], pad_token_id=raw.get("pad_token_id", 32000),
            tie_word_embeddings=False, attn_implementation="sdpa", dtype=self.dtype)
        with torch.device("meta"):
            lm = transformers.Phi3ForCausalLM(lm_cfg)
        state = {k: v for k, v in tensors.items() if not k.startswith(self.VISION)}
        lm.load_state_dict(state, strict=False, assign=True)
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=lm_cfg)  # non-persistent buffers
        self.lm = lm.eval()

        v = cfg.vision
        clip_cfg = transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu",
            layer_norm_eps=v.layer_norm_eps, attn_implementation="sdpa", dtype=self.dtype)
        with torch.device("meta"):
            clip = transformers.CLIPVisionModel(clip_cfg)
        inner = "vision_model." if hasattr(clip, "vision_model") else ""
        clip_state = {inner + k[len(self.CLIP):]: t for k, t in tensors.items() if k.startswith(self.CLIP)}
        clip.load_state_dict(clip_state, strict=False, assign=True)
        for name, buf in list(clip.named_buffers()):
            if buf.is_meta:  # position_ids
                owner = clip.get_submodule(name.rpartition(".")[0])
                owner._buffers[name.rpartition(".")[2]] = torch.arange(buf.shape[-1]).expand(buf.shape)
        self.clip = clip.eval()
        g = self.VISION
        self.glue = {k: tensors[g + k] for k in ("glb_GN", "sub_GN", "img_projection.0.weight",
                                                  "img_projection.0.bias", "img_projection.2.weight",
                                                  "img_projection.2.bias")}
        leftover = [n for n, p in list(self.lm.named_parameters()) + list(self.clip.named_parameters()) if p.is_meta]
        if leftover:
            raise RuntimeError(f"transformers models left on meta: {leftover[:5]}")

    # -- vision ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, 336, 336) -> (N, 576, C): hidden_states[-2] without CLS, as Phi-3-vision uses."""
        out = self.clip(pixel_values=crops.to(self.dtype), output_hidden_states=True)
        return out.hidden_states[-2][:, 1:]

    def _image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Spec §5: encode real crops only, 2x2 merge, sub-grid + sub_GN rows, glb_GN, global, projector."""
        g = self.glue
        out = []
        for pv, (h, w) in zip(pixel_values, image_sizes.tolist()):
            rows, cols = h // 336, w // 336
            feats = self.encode_crops(pv[: 1 + rows * cols])  # (n, 576, C)
            n, _, c = feats.shape
            merged = feats.view(n, 12, 2, 12, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, 12, 12, 4 * c)
            sep = g["sub_GN"].reshape(1, 1, 4 * c)
            subs = merged[1:].view(rows, cols, 12, 12, 4 * c).permute(0, 2, 1, 3, 4).reshape(rows * 12, cols * 12, -1)
            subs = torch.cat([subs, sep.expand(rows * 12, 1, -1)], dim=1).reshape(-1, 4 * c)
            glob = torch.cat([merged[0], sep.expand(12, 1, -1)], dim=1).reshape(-1, 4 * c)
            seq = torch.cat([subs, g["glb_GN"].reshape(1, -1), glob])
            hidden = torch.nn.functional.gelu(torch.nn.functional.linear(seq, g["img_projection.0.weight"],
                                                                         g["img_projection.0.bias"]))
            out.append(torch.nn.functional.linear(hidden, g["img_projection.2.weight"], g["img_projection.2.bias"]))
        return out

    # -- text ------------------------------------------------------------------------------------
    def _embeds(self, messages: list[dict], num_crops: int) -> torch.Tensor:
        from ..engine.chat_template import build_input_ids, render_messages
        from ..engine.image import open_image, preprocess

        prompt, sources = render_messages(messages)
        pre = self.cfg.preprocessor
        batch = preprocess([open_image(s) for s in sources], num_crops, pre.image_mean, pre.image_std) \
            if sources else None
        ids = torch.tensor(build_input_ids(self.tokenizer, prompt, batch.num_img_tokens if batch else []))
        x = self._embed_ids(ids.clamp(min=0))
        if batch is not None:
            for k, feats in enumerate(self._image_features(batch.pixel_values, batch.image_sizes), start=1):
                x[ids == -k] = feats.to(x.dtype)
        return x[None]

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(L,) token ids >= 0 -> (L, hidden) embeddings."""
        return self.lm.get_input_embeddings()(ids)

    def _generate(self, embeds: torch.Tensor, n: int) -> torch.Tensor:
        return self.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=0)

    @torch.inference_mode()
    def first_token(self, messages: list[dict], num_crops: int) -> float:
        start = time.perf_counter()
        self._generate(self._embeds(messages, num_crops), 1)
        return time.perf_counter() - start

    @torch.inference_mode()
    def followup_first_token(self, turn1: list[dict], question: str, num_crops: int, answer_tokens: int) -> float:
        """As a transformers user does it: run the whole conversation again (no KV reuse)."""
        out = self._generate(self._embeds(turn1, num_crops), answer_tokens)
        answer = self.tokenizer.decode(out[0].tolist())
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
        start = time.perf_counter()
        self._generate(self._embeds(turn2, num_crops), 1)
        return time.perf_counter() - start

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        self.lm(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def decode_times(self, prompt_ids: list[int], n: int, context: int = 0) -> list[float]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        if context:
            c = self.lm.config
            shape = (1, c.num_key_value_heads, context, c.hidden_size // c.num_attention_heads)
            gen = torch.Generator().manual_seed(0)
            for layer in range(c.num_hidden_layers):
                cache.update(torch.randn(shape, generator=gen).to(self.dtype),
                             torch.randn(shape, generator=gen).to(self.dtype), layer)
        ids = torch.tensor([[0] * context + list(prompt_ids)])
        times: list[float] = []

        class Clock:  # generate's streamer hook: put() once with the prompt, then once per token
            calls = 0

            def put(self, value):
                Clock.calls += 1
                if Clock.calls > 1:
                    times.append(time.perf_counter())

            def end(self):
                pass

        self.lm.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, streamer=Clock())
        return times
