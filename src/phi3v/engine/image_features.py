"""Images -> pixel_values -> projected features, with the two content caches.

    decoded image --(HD transform, normalise; pixel cache)--> pixel_values (crops+1, 3, 336, 336)
    pixel_values  --(CLIP + projector; feature cache)-------> features (tokens, hidden)

A follow-up about the same picture skips both steps. Misses of several prompts go through the
vision tower together, one call per crop count, and an image repeated across prompts once.
"""

from __future__ import annotations

import torch

from ..kernels.page_out import page_out
from .config import PreprocessorConfig
from .feature_cache import ImageFeatureCache, decoded_image_key, image_keys
from .image import ImageBatch, preprocess, to_rgb
from .model import Phi3VForCausalLM


class ImageFeatures:
    def __init__(self, module: Phi3VForCausalLM, preprocessor: PreprocessorConfig, cache_mb: float = 512,
                 low_memory: bool = False):
        """cache_mb: byte budget of both caches (0 = off): 1/4 pixels, 3/4 features. low_memory:
        after each encoding on the CPU, page the vision tower's mapped weights out (page_out)."""
        self.module, self.preprocessor, self.low_memory = module, preprocessor, bool(low_memory)
        self.pixel_cache, self.feature_cache = ImageFeatureCache(0), ImageFeatureCache(0)
        self.set_cache_bytes(int(cache_mb * 2**20))

    def set_cache_bytes(self, budget: int) -> None:
        """The byte budget of both caches together (0 = off): 1/4 pixels, 3/4 features."""
        budget = max(0, int(budget))
        self.pixel_cache.resize(budget // 4)
        self.feature_cache.resize(budget - budget // 4)

    def clear(self) -> None:
        self.pixel_cache.clear()
        self.feature_cache.clear()

    def preprocess(self, images, num_crops: int) -> tuple[ImageBatch, list[str]]:
        """preprocess() through the pixel cache -> (ImageBatch, content key per image). An image
        whose decoded pixels were seen before (same num_crops) reuses its pixel_values and feature
        key, which skips the HD transform and hashing the crops. Cached tensors are shared: read-only.
        `images` may be an iterator (image.open_images) that decodes each image when reached: only
        one decoded image is then alive at a time."""
        pre = self.preprocessor
        entries = []  # (pixel_values (num_crops+1, 3, 336, 336), image_size (2,), tokens, feature key)
        for image in images:
            image = to_rgb(image)  # once, for the key and the HD transform (a no-op for RGB)
            source_key = decoded_image_key(image, num_crops)
            entry = self.pixel_cache.get(source_key) if self.pixel_cache.max_bytes > 0 else None
            if entry is None:
                one = preprocess([image], num_crops, pre.image_mean, pre.image_std)
                key = image_keys(one.pixel_values, one.image_sizes)[0]
                entry = (one.pixel_values[0], one.image_sizes[0], one.num_img_tokens[0], key)
                pixels = one.pixel_values
                self.pixel_cache.put(source_key, entry, nbytes=pixels.numel() * pixels.element_size())
            entries.append(entry)
            del image  # not held while the iterator decodes the next one
        pixel_values = entries[0][0][None] if len(entries) == 1 else torch.stack([e[0] for e in entries])
        batch = ImageBatch(pixel_values, torch.stack([e[1] for e in entries]), [e[2] for e in entries])
        return batch, [e[3] for e in entries]

    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """The vision tower, uncached -> one (T_k, hidden) tensor per image on the model's device."""
        vision = self.module.model.vision_embed_tokens
        with torch.inference_mode():
            feats = vision(pixel_values.to(self.module.lm_head.weight.device), image_sizes)
        if self.low_memory and self.module.lm_head.weight.device.type == "cpu":
            page_out(vision.parameters())
        return feats

    def for_prompts(self, prepared: list) -> list[list[torch.Tensor]]:
        """Each PreparedPrompt's image features (image k at index k-1). Hashing pixels costs far
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
                feats = self.feature_cache.get(key) if self.feature_cache.max_bytes > 0 else None
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
            for key, feats in zip(keys, self.encode(pixels, sizes)):
                if self.feature_cache.max_bytes > 0:
                    self.feature_cache.put(key, feats)
                for r, k in misses[key]:
                    out[r][k] = feats
        return out
