"""KV-cache reuse across requests that share a prefix (a chat's follow-up question).

After a generation the model keeps the last conversation: the ids whose keys/values are in its
KV cache (prompt + generated tokens that were fed back), the content keys of its images and the
RoPE regime the cache was computed in. A new request reuses the longest common prefix of its
input ids with those ids and prefills only the rest; `reusable_prefix` says how long that may be.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class RetainedConversation:
    ids: list[int]  # the ids at cache slots [0, cache.length); image k's placeholders are -k
    image_keys: list[str]  # content key of image k at index k-1 (feature_cache.image_keys)
    cache: object  # decoder.KVCache, batch 1
    long_rope: bool  # every cached key was rotated with the long factors

    def __post_init__(self):
        assert len(self.ids) == self.cache.length, "retained ids must match the cache contents"


def reusable_prefix(retained: RetainedConversation, new_ids: list[int], new_image_keys: list[str],
                    new_long_rope: bool, min_tokens: int = 1) -> int:
    """How many leading tokens of `new_ids` can take their keys/values from `retained.cache`.

    0 unless all of these hold:
      - same RoPE regime: a cold run prefills the new prompt long iff it is longer than
        original_max_position_embeddings, so the cached keys must all be in that regime;
      - the ids agree on the prefix, and every image placeholder in it belongs to an image with
        the same content key (same number k is not enough: the picture may have changed);
      - at least one new token is left to prefill (the last position's logits come from it);
      - the prefix is at least `min_tokens` long (shorter reuse saves nothing worth the mask).
    """
    if retained.long_rope != new_long_rope:
        return 0
    n = min(len(retained.ids), len(new_ids) - 1)
    if n <= 0:
        return 0
    old = torch.tensor(retained.ids[:n], dtype=torch.long)
    new = torch.tensor(new_ids[:n], dtype=torch.long)
    differ = (old != new).nonzero()
    prefix = int(differ[0, 0]) if differ.numel() else n
    # Cut before the first placeholder of any image whose content changed (or is unknown).
    head = new[:prefix]
    for k in (-head[head < 0]).unique().tolist():
        same = (k - 1 < len(retained.image_keys) and k - 1 < len(new_image_keys)
                and retained.image_keys[k - 1] == new_image_keys[k - 1])
        if not same:
            prefix = min(prefix, int((head == -k).nonzero()[0, 0]))
    return prefix if prefix >= max(1, min_tokens) else 0


class ConversationCache:
    """Holds the last conversation's KV cache for the next request (thread-safe hand-over).

    take() gives the next request the reusable part (or nothing) and forgets it either way, so a
    cache is never shared by two generations; keep() stores a finished row's cache.
    """

    def __init__(self, text_cfg, enabled: bool = True, min_tokens: int = 16, max_bytes: int | None = None):
        """max_bytes: a finished conversation whose KV cache takes more is not kept (None: any;
        it is at most one context's worth). It was in memory while generating anyway, but kept
        it would stay there next to the following requests' caches."""
        self.text_cfg, self.enabled, self.min_tokens = text_cfg, bool(enabled), min_tokens
        self.max_bytes = max_bytes
        self.retained: RetainedConversation | None = None
        self._lock = threading.Lock()

    def take(self, input_ids: list[int], image_keys: list[str]) -> tuple[int, object]:
        """-> (tokens reused, one-row KVCache cut to them) or (0, None)."""
        with self._lock:
            retained, self.retained = self.retained, None
        if retained is None or not self.enabled:
            return 0, None
        new_long = self.text_cfg.uses_long_rope(len(input_ids))
        reuse = reusable_prefix(retained, input_ids, image_keys, new_long, self.min_tokens)
        if not reuse:
            return 0, None  # `retained` goes: its memory is freed before a new cache grows
        retained.cache.truncate(reuse)
        return reuse, retained.cache

    def keep(self, input_ids: list[int], image_keys: list[str], generated: list[int], cache, long_rope: bool) -> None:
        """Store a finished sequence: its cache holds prompt + generated tokens fed back (the
        last generated token never is)."""
        if not self.enabled or cache is None:
            return
        if self.max_bytes is not None and cache.nbytes() > self.max_bytes:
            self.clear()  # neither this one nor an older one: the next request starts cold
            return
        ids = (list(input_ids) + list(generated))[:cache.length]
        retained = RetainedConversation(ids, list(image_keys), cache, long_rope)
        with self._lock:
            self.retained = retained

    def clear(self) -> None:
        with self._lock:
            self.retained = None
