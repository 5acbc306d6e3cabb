"""Memory a request will take, from the config alone (no weights): the KV cache exactly as the engine
allocates it, and an estimate of the peak (docs/video.md shows an example).

    plan = plan_memory(facts, "bfloat16", quantize=None, prompt_tokens=12_500, new_tokens=512,
                       image_crops=[3] * 16, num_crops=4, vision_chunk=4)
    plan.kv_cache_bytes      exact: the slots KVCache ends with (kv_cache_slots) x bytes per slot
    plan.peak_bytes          estimate: weights + the largest of the three phases below

The phases of one request (each term is a tensor the engine holds then; activations are estimated
from the layer widths, since temporaries depend on torch's kernels):
  vision   pixel_values of every image + the features made so far + one vision_chunk of CLIP
           activations (crops x 577 tokens x (6 x hidden + intermediate), the widest layer temporaries)
  prefill  pixel_values + features + the prompt's embeddings and one layer's activations over at
           most PREFILL_PIECE_TOKENS rows (rows x (3 x intermediate + 5 x hidden)) + the KV cache
           sized for the prompt
  decode   pixel_values + features (the image caches keep them) + the KV cache at its last size
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .devices import dtype_bytes
from .decoder import KVCache
from .image import CROP_SIZE

PIXEL_BYTES = 4  # pixel_values are float32
PREFILL_PIECE_TOKENS = 1024  # engine.generate.ONE_PASS_MAX_TOKENS: a longer prompt is prefilled in pieces


def kv_cache_slots(prompt_tokens: int, new_tokens: int, max_len: int) -> int:
    """The capacity (positions) of the one-row KVCache after a prompt and new_tokens generated.

    The engine's rules (decoder.KVCache.reserve): the prefill reserves the prompt, rounded up to
    GROW_CHUNK; each decode step stores one more position (the last token generated is never
    stored: prompt + new_tokens - 1 positions), growing by a quarter, rounded up to GROW_CHUNK,
    never past max_len."""
    grow = KVCache.GROW_CHUNK

    def rounded(n: int) -> int:
        return min(max_len, -(-n // grow) * grow)

    capacity = rounded(prompt_tokens)
    needed = prompt_tokens + max(0, new_tokens - 1)
    while capacity < min(needed, max_len):
        capacity = rounded(max(capacity + 1, capacity + capacity // 4))
    return capacity


@dataclass(frozen=True)
class MemoryPlan:
    dtype: str
    quantize: str | None
    prompt_tokens: int
    new_tokens: int
    weights_bytes: int
    kv_cache_slots: int
    kv_cache_bytes: int  # at the answer's last token
    pixel_bytes: int  # pixel_values of every image / frame (float32)
    feature_bytes: int  # projected image features (image tokens x hidden)
    vision_chunk_crops: int  # crops per vision-tower call
    vision_chunk_bytes: int  # one call's CLIP activations (estimate)
    prefill_bytes: int  # embeddings + one decoder layer's activations over the prompt (estimate)
    peak_bytes: int  # estimate

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(facts, dtype, quantize: str | None, prompt_tokens: int, new_tokens: int,
                image_crops: list[int], num_crops: int, vision_chunk: int | None,
                image_tokens: int | None = None, prefill_chunk: int | None = None) -> MemoryPlan:
    """facts: engine.facts.ModelFacts. image_crops: crops CLIP encodes per image (global view +
    its sub-crops); num_crops: the pixel_values' crop slots per image (+1 for the global view);
    prefill_chunk: prompt rows per decoder call when the prefill runs in chunks (None: the
    engine's own pieces of PREFILL_PIECE_TOKENS for a long prompt alone)."""
    from .devices import dtype_name, parse_dtype

    dt = parse_dtype(dtype)
    size = dtype_bytes(dt)
    cfg = facts.config
    text, vision = cfg.text, cfg.vision
    weights = facts.weight_bytes(dt, quantize)
    slots = kv_cache_slots(prompt_tokens, new_tokens, facts.context_length)
    per_slot = facts.kv_cache_bytes_per_token(dt)
    pixels = len(image_crops) * (num_crops + 1) * 3 * CROP_SIZE * CROP_SIZE * PIXEL_BYTES
    features = (image_tokens if image_tokens is not None else 0) * text.hidden_size * size
    total_crops = sum(image_crops)
    chunk = min(total_crops, vision_chunk) if vision_chunk else total_crops
    clip_tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # 577: the patches and the class token
    chunk_bytes = chunk * clip_tokens * (6 * vision.hidden_size + vision.intermediate_size) * size
    chunk_bytes += chunk * 3 * CROP_SIZE * CROP_SIZE * size  # the chunk's pixels in the tower's dtype
    rows = min(prompt_tokens, prefill_chunk or PREFILL_PIECE_TOKENS)
    prefill = prompt_tokens * text.hidden_size * size + rows * (3 * text.intermediate_size + 4 * text.hidden_size) * size
    kv_prompt = kv_cache_slots(prompt_tokens, 1, facts.context_length) * per_slot
    kept = pixels + features
    phases = (chunk_bytes, prefill + kv_prompt, slots * per_slot)
    return MemoryPlan(dtype_name(dt), quantize, prompt_tokens, new_tokens, weights, slots, slots * per_slot,
                      pixels, features, chunk, chunk_bytes, prefill, weights + kept + max(phases))
