"""The server keeps several conversations' KV caches: a follow-up turn that extends an earlier
request (same images, same earlier turns) prefills only its new tokens, and the answer is the one
a cold run gives. Long prompts join the running batch in chunks."""

from __future__ import annotations

import phi3v
from phi3v.server import ServerSettings
from server_harness import RunningServer, as_python_api, image_part, png_bytes

IMG_A = png_bytes(44, 36, seed=31)
IMG_B = png_bytes(36, 44, seed=32)


def turn(image, question):
    return [{"role": "user", "content": [image_part(image), {"type": "text", "text": question}]}]


def test_interleaved_conversations_each_reuse_their_own_prefix(tiny_model_dir):
    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
    cold = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, prefix_cache=False)
    settings = ServerSettings(default_num_crops=1, retained_conversations=4, prefill_chunk=8)
    with RunningServer(model, settings) as srv:
        model_id = srv.health()["model"]
        client = srv.client()

        def ask(messages):
            r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, temperature=0)
            return r.choices[0].message.content

        a1 = turn(IMG_A, "Describe picture A in a few words, please, in detail.")
        b1 = turn(IMG_B, "And what is in picture B, the other one?")
        answers = {"a1": ask(a1), "b1": ask(b1)}  # two conversations, kept side by side
        assert len(model.conversation) == 2
        a2 = a1 + [{"role": "assistant", "content": answers["a1"]}, {"role": "user", "content": "More on A?"}]
        b2 = b1 + [{"role": "assistant", "content": answers["b1"]}, {"role": "user", "content": "More on B?"}]
        hits = model.conversation.hits
        answers["a2"], answers["b2"] = ask(a2), ask(b2)
        assert model.conversation.hits == hits + 2, "each follow-up reused its own conversation"

    for name, messages in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2)):
        want = cold.chat(as_python_api(messages), max_new_tokens=6, num_crops=1, temperature=0.0).text
        assert answers[name] == want, name


def test_conversation_cache_keeps_within_its_entry_and_byte_budgets(tiny_model):
    from phi3v.engine.prefix_cache import ConversationCache

    text_cfg = tiny_model.config.text
    caches = []
    for n in (40, 50, 60):
        c = tiny_model.module.new_cache()
        c.reserve(n)
        c.length = n
        caches.append(c)
    conv = ConversationCache(text_cfg, max_entries=2)
    for k, c in enumerate(caches):
        conv.keep(list(range(100 + k, 100 + k + c.length)), [], [], c, False)
    assert len(conv) == 2 and conv.retained.cache is caches[2]  # newest first, the oldest evicted
    reuse, cache = conv.take(list(range(101, 101 + 50)) + [7, 8], [])
    assert (reuse, cache) == (50, caches[1]) and len(conv) == 1  # handed over, not shared
    assert conv.take([1, 2, 3] * 20, [])[0] == 0 and len(conv) == 1  # no match: others stay (2 slots)
    small = ConversationCache(text_cfg, max_entries=8, max_bytes=caches[0].nbytes() + 1)
    small.keep(list(range(40)), [], [], caches[0], False)
    small.keep(list(range(1, 61)), [], [], caches[2], False)
    assert len(small) == 1 and small.retained.cache is caches[2]  # bytes: the older one went
