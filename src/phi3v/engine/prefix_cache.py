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
    """Finished conversations' KV caches, kept for requests that continue them (thread-safe).

    An LRU of at most `max_entries` conversations whose caches take at most `max_bytes` together.
    take() hands the entry with the longest reusable prefix to the next request and forgets it (a
    cache is never shared by two generations); keep() stores a finished row's cache, newest first,
    evicting the least recently used beyond the budgets. With one entry (the Python API's default)
    a request that cannot reuse it drops it, so its memory is free before a new cache grows.
    """

    def __init__(self, text_cfg, enabled: bool = True, min_tokens: int = 16, max_bytes: int | None = None,
                 max_entries: int = 1):
        """max_bytes: byte budget of all kept caches (None: any; one cache is at most one
        context's worth). It was in memory while generating anyway, but kept it would stay there
        next to the following requests' caches."""
        self.text_cfg, self.enabled, self.min_tokens = text_cfg, bool(enabled), min_tokens
        self.max_bytes, self.max_entries = max_bytes, max(1, int(max_entries))
        self._entries: list[RetainedConversation] = []  # most recently used first
        self._lock = threading.Lock()
        self.hits = 0  # requests that reused a kept prefix
        self.misses = 0

    @property
    def retained(self) -> RetainedConversation | None:
        """The most recently kept conversation (None when nothing is kept)."""
        with self._lock:
            return self._entries[0] if self._entries else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.cache.nbytes() for e in self._entries)

    def take(self, input_ids: list[int], image_keys: list[str]) -> tuple[int, object]:
        """-> (tokens reused, one-row KVCache cut to them) or (0, None)."""
        if not self.enabled:
            return 0, None
        new_long = self.text_cfg.uses_long_rope(len(input_ids))
        with self._lock:
            best, reuse = None, 0
            for entry in self._entries:
                n = reusable_prefix(entry, input_ids, image_keys, new_long, self.min_tokens)
                if n > reuse:
                    best, reuse = entry, n
            if best is not None:
                self._entries = [e for e in self._entries if e is not best]
                self.hits += 1
            else:
                self.misses += 1
                if self.max_entries == 1:
                    self._entries = []  # free it before the new request's cache grows
        if best is None:
            return 0, None
        best.cache.truncate(reuse)
        return reuse, best.cache

    def keep(self, input_ids: list[int], image_keys: list[str], generated: list[int], cache, long_rope: bool) -> None:
        """Store a finished sequence: its cache holds prompt + generated tokens fed back (the
        last generated token never is)."""
        if not self.enabled or cache is None:
            return
        size = cache.nbytes()
        if self.max_bytes is not None and size > self.max_bytes:
            if self.max_entries == 1:
                self.clear()  # neither this one nor an older one: the next request starts cold
            return
        ids = (list(input_ids) + list(generated))[:cache.length]
        entry = RetainedConversation(ids, list(image_keys), cache, long_rope)
        with self._lock:
            self._entries.insert(0, entry)
            del self._entries[self.max_entries:]
            if self.max_bytes is not None:
                total = 0
                for k, e in enumerate(self._entries):
                    total += e.cache.nbytes()
                    if total > self.max_bytes:
                        del self._entries[k:]
                        break

    def clear(self) -> None:
        with self._lock:
            self._entries = []
