"""Image caches keyed by content: a follow-up question about the same picture (same chat, or the
same file sent again) skips the HD transform and the CLIP tower.

Two keys, both sha256: `decoded_image_key` (the decoded RGB pixels + num_crops) finds an image's
preprocessed pixel_values; `image_keys` (the pixel_values CLIP sees) finds its projected features.
`ImageFeatureCache` is the byte-bounded LRU that holds either.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch


def decoded_image_key(image, num_crops: int) -> str:
    """Key of a decoded PIL image for the preprocessing cache: its RGB bytes as preprocess sees
    them (image.to_rgb: same conversion, EXIF orientation already applied by open_image)."""
    from .image import to_rgb

    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{int(num_crops)}:{rgb.width}x{rgb.height}|".encode())
    # In strips of ~4 MB: the same digest as rgb.tobytes() at once, without a copy of the whole
    # image (120 MB for 40 Mpx) on top of the image itself.
    rows = max(1, _HASH_STRIP_BYTES // (3 * rgb.width))
    for top in range(0, rgb.height, rows):
        digest.update(rgb.crop((0, top, rgb.width, min(rgb.height, top + rows))).tobytes())
    return digest.hexdigest()


_HASH_STRIP_BYTES = 4 * 2**20


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
    """LRU map key -> value (features (T, hidden) on the model's device, or any value with its
    size given to put), bounded by bytes.

    `max_bytes` 0 disables it. A single entry larger than the budget is not kept. The lock makes
    each get/put atomic; generation itself is still one at a time per model.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, tuple[object, int]] = OrderedDict()  # key -> (value, bytes)
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        """Whether key is held now (not counted as a lookup; a get() may still miss after it)."""
        return key in self._entries

    def get(self, key: str):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, value, nbytes: int | None = None) -> None:
        """nbytes defaults to the size of `value` as a tensor."""
        size = int(nbytes) if nbytes is not None else value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size)
            self._bytes += size
            self._evict()

    def resize(self, max_bytes: int) -> None:
        """A new budget (0 = off); least recently used entries go until the rest fits."""
        with self._lock:
            self.max_bytes = max(0, int(max_bytes))
            self._evict()

    def _evict(self) -> None:  # under the lock
        while self._bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
