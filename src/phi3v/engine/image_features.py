"""Images -> pixel_values -> projected features, with the two content caches.

    decoded image --(HD transform, normalise; pixel cache)--> pixel_values (crops+1, 3, 336, 336)
    pixel_values  --(CLIP + projector; feature cache)-------> features (tokens, hidden)

A follow-up about the same picture skips both steps. The misses of one or several prompts are a
FeatureJob: the vision tower runs on at most `vision_chunk` crops per call (the images one after
the other; an image repeated across prompts once), all at once (run) or a piece per step (step).
"""

from __future__ import annotations

import torch

from ..errors import Phi3VError
from ..kernels.page_out import page_out
from .config import PreprocessorConfig
from .feature_cache import ImageFeatureCache, decoded_image_key, image_keys
from .image import ImageBatch, preprocess, to_rgb
from .model import Phi3VForCausalLM
from .vision import ImageEncoding


class ImageFeatures:
    def __init__(self, module: Phi3VForCausalLM, preprocessor: PreprocessorConfig, cache_mb: float = 512,
                 low_memory: bool = False):
        """cache_mb: byte budget of both caches (0 = off): 1/4 pixels, 3/4 features. low_memory:
        after each encoding on the CPU, page the vision tower's mapped weights out (page_out)."""
        self.module, self.preprocessor, self.low_memory = module, preprocessor, bool(low_memory)
        if self.low_memory:  # oneDNN packs of the CLIP layers are anonymous memory page_out cannot free
            module.model.vision_embed_tokens.img_processor.vision_model.packed_weights = False
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

    @property
    def vision_chunk(self) -> int | None:
        """Crops per CLIP call (None or 0: every crop of a request in one call); the tower's setting."""
        return self.module.model.vision_embed_tokens.vision_chunk

    @vision_chunk.setter
    def vision_chunk(self, crops: int | None) -> None:
        if crops is not None and (isinstance(crops, bool) or not isinstance(crops, int) or crops < 0):
            raise Phi3VError(f"vision_chunk must be a whole number of crops >= 0 (0 = all at once), got {crops!r}")
        self.module.model.vision_embed_tokens.vision_chunk = crops or None

    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """The vision tower, uncached (at most vision_chunk crops per CLIP call) -> one (T_k, hidden)
        tensor per image on the model's device."""
        vision = self.module.model.vision_embed_tokens
        with torch.inference_mode():
            feats = vision(pixel_values.to(self.module.lm_head.weight.device), image_sizes)
        self._page_out()
        return feats

    def start(self, prepared: list) -> FeatureJob:
        """The image features of PreparedPrompts: cache hits at once, misses in a FeatureJob to
        step a piece at a time (or run()). Hashing pixels costs far less than encoding them, so
        content keys are computed (prepared.image_keys) even with the cache off."""
        return FeatureJob(self, prepared)

    def for_prompts(self, prepared: list) -> list[list[torch.Tensor]]:
        """Each PreparedPrompt's image features (image k at index k-1), computed now; an image
        repeated across the prompts is encoded once."""
        return self.start(prepared).run()

    def _page_out(self) -> None:
        if self.low_memory and self.module.lm_head.weight.device.type == "cpu":
            page_out(self.module.model.vision_embed_tokens.parameters())


class FeatureJob:
    """The image features of some prompts, the cache misses computed a piece at a time.

    `features[r][k]` is prompt r's image k+1 once `done`. Each step() runs the vision tower once
    on at most `vision_chunk` crops (ImageEncoding); an image whose features another job put in
    the feature cache meanwhile is taken from there. A DecodeLoop steps a row's job between its
    decode steps (Row.features), so a newcomer's images never stall the rows already decoding
    for more than one piece.
    """

    def __init__(self, owner: ImageFeatures, prepared: list):
        self.owner = owner
        self.features: list[list] = [[None] * len(p.images.num_img_tokens) if p.images is not None else []
                                     for p in prepared]
        cache = owner.feature_cache
        misses: dict[str, list[tuple[int, int]]] = {}  # key -> the (prompt, image) places that need it
        for r, p in enumerate(prepared):
            if p.images is None:
                continue
            if p.image_keys is None:
                p.image_keys = image_keys(p.images.pixel_values, p.images.image_sizes)
            for k in range(len(self.features[r])):
                key = p.image_keys[k]
                feats = cache.get(key) if cache.max_bytes > 0 else None
                if feats is not None:
                    self.features[r][k] = feats
                else:
                    misses.setdefault(key, []).append((r, k))
        self._keys = list(misses)
        self._places = [misses[key] for key in self._keys]
        self._encoding = None
        if self._keys:
            first = [places[0] for places in self._places]
            # (I, n+1, 3, 336, 336): views into the prompts' pixels where their crop counts agree
            pixels = [prepared[r].images.pixel_values[k] for r, k in first]
            sizes = torch.stack([prepared[r].images.image_sizes[k] for r, k in first])
            vision = owner.module.model.vision_embed_tokens
            images = [(px, (int(h), int(w))) for px, (h, w) in zip(pixels, sizes.tolist())]
            self._encoding = ImageEncoding(vision, images, vision.vision_chunk, self._cached)

    @property
    def done(self) -> bool:
        return self._encoding is None or self._encoding.done

    def step(self, chunk: int | None = None, layers: int | None = None) -> bool:
        """Encode the next piece (at most `chunk` crops; None: the tower's vision_chunk; 0: all
        that are left), or with `layers`, that many CLIP layers of it -> True once every feature
        is in."""
        if self.done:
            return True
        device = self.owner.module.lm_head.weight.device
        try:
            for i in self._encoding.step(chunk, layers):
                feats = self._encoding.features[i]
                if feats.device != device:
                    feats = feats.to(device)
                if self.owner.feature_cache.max_bytes > 0:
                    self.owner.feature_cache.put(self._keys[i], feats)
                for r, k in self._places[i]:
                    self.features[r][k] = feats
        except BaseException:
            self._encoding = None  # its pixels and partial activations go now
            self.owner._page_out()
            raise
        if self._encoding.done:
            self._encoding = None
            self.owner._page_out()
            return True
        return False

    def run(self) -> list[list[torch.Tensor]]:
        while not self.step():
            pass
        return self.features

    def _cached(self, i: int) -> torch.Tensor | None:
        cache = self.owner.feature_cache
        return cache.get(self._keys[i]) if cache.max_bytes > 0 and self._keys[i] in cache else None
