"""OpenVINO as a bench engine: the IR of bench/openvino_convert.py behind bench/engines' interface.

The decoder is stateful (its KV cache lives in the infer request, in the plugin's KV-cache
precision); every call feeds inputs_embeds, a 4-D additive mask (1, 1, T, past+T) and positions.
Text embeddings and the image glue (2x2 merge, separators, projector) are torch on the checkpoint's
tensors (TransformersEngine's code), the CLIP tower is the vision IR: a request is composed the same
way as for the transformers variant, so TTFT covers preprocessing, vision, glue and prefill.

`runtime_info()` is what OpenVINO reports it ran: the compiled model's properties (inference
precision, KV-cache precision, dynamic quantization group) and the runtime precision of its
matrix-product nodes.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .engines import TransformersEngine

_NEG = -3.0e4  # additive mask value for a hidden slot: finite in fp16 (the traced graph's type)
PROPERTIES = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE",
              "EXECUTION_MODE_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT")


class OpenVINOEngine(TransformersEngine):
    def __init__(self, model_dir: Path, ir_dir: Path, threads: int | None = None, config: dict | None = None):
        super().__init__(model_dir, "bfloat16")
        self.ir_dir, self.threads, self.config = Path(ir_dir), threads, dict(config or {})
        self.meta = json.loads((self.ir_dir / "meta.json").read_text(encoding="utf-8"))
        self.past = 0  # tokens in the decoder request's state

    def load(self) -> None:
        import openvino as ov
        from safetensors import safe_open

        from ..engine.config import Phi3VConfig
        from ..engine.tokenizer import Tokenizer
        from ..engine.weights import checkpoint_files

        self.cfg, self.tokenizer = Phi3VConfig.from_dir(self.model_dir), Tokenizer.from_dir(self.model_dir)
        files = checkpoint_files(self.model_dir)
        wanted = ["model.embed_tokens.weight"] + [self.VISION + k for k in (
            "glb_GN", "sub_GN", "img_projection.0.weight", "img_projection.0.bias", "img_projection.2.weight",
            "img_projection.2.bias")]
        tensors = {}
        for name in wanted:
            with safe_open(str(files[name]), framework="pt") as f:
                tensors[name] = f.get_tensor(name).to(self.dtype)
        self.embed_table = tensors["model.embed_tokens.weight"]
        self.glue = {k[len(self.VISION):]: t.float() for k, t in tensors.items() if k.startswith(self.VISION)}
        config = {"PERFORMANCE_HINT": "LATENCY", **self.config}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        core = ov.Core()
        t0 = time.perf_counter()
        self.decoder = core.compile_model(str(self.ir_dir / "decoder.xml"), "CPU", config)
        self.vision = core.compile_model(str(self.ir_dir / "vision.xml"), "CPU", config)
        self.compile_s = time.perf_counter() - t0
        self.request = self.decoder.create_infer_request()
        self.vision_request = self.vision.create_infer_request()
        self.states = {s.name: s for s in self.request.query_state()}

    # -- what ran --------------------------------------------------------------------------------
    def runtime_info(self) -> dict:
        import openvino as ov

        def props(compiled) -> dict:
            out = {}
            for name in PROPERTIES:
                try:
                    value = compiled.get_property(name)
                    out[name] = value.get_type_name() if isinstance(value, ov.Type) else str(value)  # "bf16", "u8"
                except RuntimeError:  # a property this plugin version does not have
                    pass
            return out

        def precisions(compiled) -> dict:
            """'node kind:runtime precision' -> count, over the nodes that do the work (matrix
            products, attention, the fused subgraphs) and MemoryInput (a KV state the plugin did not
            fuse into its attention is kept at that precision)."""
            seen = Counter()
            for op in compiled.get_runtime_model().get_ops():
                info = op.get_rt_info()
                kind = info["layerType"].value if "layerType" in info else op.get_type_name()
                if kind in ("FullyConnected", "MatMul", "ScaledDotProductAttention", "Convolution", "Subgraph",
                            "MemoryInput"):
                    prec = info["runtimePrecision"].value if "runtimePrecision" in info else "?"
                    seen[f"{kind}:{prec}"] += 1
            return dict(sorted(seen.items()))

        def kv_cache(compiled) -> dict:
            """KV-cache precision -> count of attention nodes that hold the cache themselves (the
            plugin's fused attention-with-cache; its rt_info says how it stores keys/values)."""
            seen = Counter()
            for op in compiled.get_runtime_model().get_ops():
                info = op.get_rt_info()
                if "kv_cache_precision" in info:
                    seen[info["kv_cache_precision"].value] += 1
            return dict(seen)

        return {"openvino": ov.__version__, "decoder_weights": self.meta["decoder_weights"],
                "vision_weights": self.meta["vision_weights"], "convert_s": self.meta.get("convert_s"),
                "compile_s": self.compile_s, "decoder": props(self.decoder), "vision": props(self.vision),
                "decoder_nodes": precisions(self.decoder), "vision_nodes": precisions(self.vision),
                "kv_cache_nodes": kv_cache(self.decoder)}

    # -- vision ----------------------------------------------------------------------------------
    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, 336, 336) -> (N, 576, C) float32."""
        out = self.vision_request.infer({"pixel_values": crops.float().numpy()})
        return torch.from_numpy(out[self.vision.outputs[0]].copy())

    def _image_features(self, pixel_values, image_sizes):
        return super()._image_features(pixel_values.float(), image_sizes)

    # -- decoder ---------------------------------------------------------------------------------
    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.embed_table)

    def reset(self) -> None:
        self.request.reset_state()
        self.past = 0

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds (T, hidden) after the `past` cached tokens -> last-position logits (V,) float32."""
        T, P = embeds.shape[0], self.past
        mask = np.zeros((1, 1, T, P + T), dtype=np.float32)
        if T > 1:  # causal within the new tokens; every cached slot is visible
            mask[0, 0, :, P:] = np.triu(np.full((T, T), _NEG, dtype=np.float32), 1)
        out = self.request.infer({"inputs_embeds": embeds.float().numpy()[None], "attention_mask": mask,
                                  "position_ids": np.arange(P, P + T, dtype=np.int64)[None],
                                  "beam_idx": np.zeros(1, dtype=np.int32)})
        self.past = P + T
        return torch.from_numpy(out["logits"][0, -1].copy())

    def fill_context(self, context: int) -> None:
        """The state holds `context` random keys/values, as the other engines' decode_times do."""
        self.reset()
        if not context:
            return
        m = self.meta
        gen = torch.Generator().manual_seed(0)
        shape = (1, m["kv_heads"], context, m["head_dim"])
        import openvino as ov

        for state in self.request.query_state():
            values = torch.randn(shape, generator=gen)
            tensor = ov.Tensor(state.state.element_type, ov.Shape(list(shape)))
            if tensor.element_type == ov.Type.bf16:  # numpy has no bf16: copy the raw 16-bit patterns
                tensor.data.view(np.int16)[...] = values.to(torch.bfloat16).view(torch.int16).numpy()
            else:
                tensor.data[...] = values.numpy()
            state.state = tensor
        self.past = context

    def _greedy(self, embeds: torch.Tensor, n: int, on_token=None) -> list[int]:
        """Prefill embeds (T, hidden) on the current state, then n greedy tokens in all."""
        logits = self.step(embeds)
        tokens = []
        for i in range(n):
            tokens.append(int(logits.argmax()))
            if on_token:
                on_token()
            if i + 1 < n:
                logits = self.step(self._embed_ids(torch.tensor(tokens[-1:])))
        return tokens

    def first_token(self, messages: list[dict], num_crops: int) -> float:
        start = time.perf_counter()
        self.reset()
        self._greedy(self._embeds(messages, num_crops)[0], 1)
        return time.perf_counter() - start

    def followup_first_token(self, turn1: list[dict], question: str, num_crops: int, answer_tokens: int) -> float:
        """As the transformers variant: the whole conversation again (no KV reuse across requests)."""
        self.reset()
        answer = self.tokenizer.decode(self._greedy(self._embeds(turn1, num_crops)[0], answer_tokens))
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
        return self.first_token(turn2, num_crops)

    def prefill(self, ids: list[int]) -> None:
        self.reset()
        self.step(self._embed_ids(torch.tensor(ids)))

    def decode_times(self, prompt_ids: list[int], n: int, context: int = 0) -> list[float]:
        self.fill_context(context)
        times: list[float] = []
        self._greedy(self._embed_ids(torch.tensor(prompt_ids)), n, on_token=lambda: times.append(time.perf_counter()))
        return times
