"""Image-feature cache: projected image features keyed by the image's pixels and num_crops.

A follow-up question about the same picture (same chat, or the same file sent again) then skips
the CLIP tower and the projector. Entries are evicted least-recently-used once their total size
passes a byte budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch


def image_keys(pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[str]:
    """One content key per image: sha256 over num_crops, the HD size [H, W] and the float32
    pixels of the crops CLIP actually sees (global view + real crops; padding crops are zeros and
    never encoded). pixel_values (N, num_crops+1, 3, 336, 336), image_sizes (N, 2)."""
    num_crops = pixel_values.shape[1] - 1
    crop = pixel_values.shape[-1]
    keys = []
    for i, (h, w) in enumerate(image_sizes.tolist()):
        used = 1 + (int(h) // crop) * (int(w) // crop)
        pixels = pixel_values[i, :used].detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(f"{num_crops}:{int(h)}x{int(w)}:{tuple(pixels.shape)}|".encode())
        digest.update(memoryview(pixels.numpy()).cast("B"))
        keys.append(digest.hexdigest())
    return keys


class ImageFeatureCache:
    """LRU map key -> features (T, hidden) tensor on the model's device, bounded by bytes.

    `max_bytes` 0 disables it. A single entry larger than the budget is not kept. The lock makes
    each get/put atomic; generation itself is still one at a time per model.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            feats = self._entries.get(key)
            if feats is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = self._size(feats)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._entries[key] = feats
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self._size(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
