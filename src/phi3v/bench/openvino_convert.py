"""A checkpoint -> OpenVINO IR for the `openvino-*` bench variants, converted once and cached.

    python -m phi3v.bench.openvino_convert --model DIR --scheme int4 --out IR_DIR

What is converted, from the checkpoint's own tensors (bench/engines.TransformersEngine builds them):
  decoder.xml  transformers' Phi3ForCausalLM (Phi-3-vision's decoder is Phi-3-mini), traced with
               `ov.convert_model` on a step module: inputs_embeds (1, T, hidden), a 4-D additive
               attention mask (1, 1, T, past+T), position_ids (1, T), beam_idx (1,) = [0]; the KV
               cache made stateful the way OpenVINO's LLM exports are (make_stateful), so the CPU
               plugin fuses attention with it and keeps it in its KV-cache precision.  Why not
               optimum-intel: optimum-intel 2.2 needs transformers < 5.6, and this project's
               test extra resolves a newer one; tracing the same transformers class ourselves keeps
               one environment.  A 4-D mask is used as given by transformers (no mask-building code
               in the traced graph), so one graph serves prefill and decode at any length.
  vision.xml   transformers' CLIPVisionModel, output hidden_states[-2] without the class token (what
               Phi-3-vision uses), pixel_values (N, 3, 336, 336) -> (N, 576, C).
Weights as OpenVINO's published Phi-3.5-vision models have them (nncf.compress_weights):
  bf16: bf16 weights in the IR, the plugin's inference precision (fp16 ones cost a converted copy)
  int8: decoder INT8_ASYM per output channel, vision INT8_ASYM
  int4: decoder INT4_ASYM, group 128, ratio 1.0 (NNCF keeps the embedding-adjacent layers int8, its
        default), vision INT8_ASYM
The glue (2x2 merge, separators, projector) and the embedding lookup stay in torch, as with the
transformers variant.  meta.json records what was done.  The folder name carries a key of the
checkpoint (config, file names, sizes, times) and the scheme: reruns find it and skip conversion.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

EXTRA_HINT = "pip install 'phi3v[openvino]'"
# Per scheme: bump one when its conversion changes (its cached IR is then rebuilt, the others kept).
CONVERTER_VERSIONS = {"bf16": "5", "int8": "4", "int4": "4"}
SCHEMES = ("bf16", "int8", "int4")
INT4_GROUP = 128


def missing_extra() -> str:
    """'' when openvino and nncf import, else one line saying what to install."""
    import importlib.util

    missing = [m for m in ("openvino", "nncf") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed: {EXTRA_HINT}" if missing else ""


def checkpoint_key(folder: Path, scheme: str) -> str:
    """A short hash of what the IR is made from: the scheme's converter version, config.json's bytes,
    each safetensors file's name, size and modification time (not its contents: 8 GB would take a
    minute to hash)."""
    h = hashlib.sha256(CONVERTER_VERSIONS[scheme].encode())
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def ir_folder(checkpoint: Path, scheme: str, data_dir: Path) -> Path:
    return Path(data_dir) / "openvino-ir" / f"{Path(checkpoint).name}-{checkpoint_key(Path(checkpoint), scheme)}-{scheme}"


def ensure_ir(checkpoint: Path, scheme: str, data_dir: Path, log=print) -> tuple[Path, float | None]:
    """The IR folder of (checkpoint, scheme), converted first in a child process when missing (its
    peak memory is the conversion's, not the benchmark's) -> (folder, seconds it took or None)."""
    folder = ir_folder(checkpoint, scheme, data_dir)
    if (folder / "meta.json").is_file():
        return folder, None
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    log(f"converting {checkpoint} to OpenVINO IR ({scheme}) in {folder} (once)")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "phi3v.bench.openvino_convert", "--model", str(checkpoint), "--scheme", scheme,
           "--out", str(partial)]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0 or not (partial / "meta.json").is_file():
        raise RuntimeError(f"OpenVINO conversion ({scheme}) failed with exit code {proc.returncode}")
    partial.rename(folder)
    return folder, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# conversion (runs in the child process)


class _DecoderStep(torch.nn.Module):
    """Phi3ForCausalLM over an explicit KV cache: (inputs_embeds, mask, positions, *past k/v per
    layer (1, KVH, P, D)) -> (last-position logits (1, 1, V), *present k/v (1, KVH, P+T, D))."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for i, layer in enumerate(cache.layers):  # filled directly: no empty-tensor concat in the graph
            layer.keys, layer.values, layer.is_initialized = past[2 * i], past[2 * i + 1], True
            layer.device = past[2 * i].device
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class _VisionTower(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        return self.clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]


def state_names(layers: int) -> list[tuple[str, str]]:
    """(past input, present output) name pairs, one per layer and key/value."""
    return [(f"past.{i}.{kv}", f"present.{i}.{kv}") for i in range(layers) for kv in ("key", "value")]


def make_stateful(model, pairs: list[tuple[str, str]], kv_heads: int, head_dim: int) -> None:
    """Each (past input, present output) pair becomes one variable: ReadValue (starting as an empty
    (1, KVH, 0, D) cache) -> Gather(beam_idx) -> the layer's Concat, whose result is Assigned back.
    That is the graph shape OpenVINO's own LLM exports have, and the one the CPU plugin fuses into
    its attention-with-KV-cache node, where the cache is kept in KV_CACHE_PRECISION.
    (apply_make_stateful_transformation alone leaves the ReadValue without an initial value, and
    the fused node then fails to compile; without the Gather the fusion does not happen.)"""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.op import assign
    from openvino.op.util import Variable, VariableInfo

    beam = ops.parameter(ov.PartialShape([1]), ov.Type.i32, name="beam_idx")
    beam.output(0).get_tensor().set_names({"beam_idx"})
    model.add_parameters([beam])
    for past, present in pairs:
        param, result = model.input(past).get_node(), model.output(present).get_node()
        info = VariableInfo()
        info.data_shape = ov.PartialShape([1, kv_heads, -1, head_dim])
        info.data_type = param.get_output_element_type(0)
        info.variable_id = past
        var = Variable(info)
        zero = ops.convert(ops.constant(np.array(0, dtype=np.float32)), info.data_type)  # the cache's type
        empty = ops.broadcast(zero.output(0), ops.constant(np.array([1, kv_heads, 0, head_dim], dtype=np.int64)).output(0))
        state = ops.gather(ops.read_value(empty, var), beam, ops.constant(np.int64(0)))
        for target in param.output(0).get_target_inputs():
            target.replace_source_output(state.output(0))
        model.add_variables([var])
        model.add_sinks([assign(result.input_value(0).get_node(), var)])
        model.remove_result(result)
        model.remove_parameter(param)
    model.validate_nodes_and_infer_types()


def convert_decoder(lm):
    import openvino as ov

    c = lm.config
    # Phi-3's sliding window (131072) is never reached within its context, but transformers' cache
    # for it trims what it keeps (a Slice between the Concat and the stored state), which hides
    # the pattern the CPU plugin fuses (see make_stateful).  The attention is the same without it.
    c.sliding_window = None
    layers, kvh = c.num_hidden_layers, c.num_key_value_heads
    d, hidden = c.hidden_size // c.num_attention_heads, c.hidden_size
    P, T = 3, 5  # example lengths (any: the graph keeps them dynamic)
    dtype = next(lm.parameters()).dtype
    example = (torch.randn(1, T, hidden, dtype=dtype), torch.zeros(1, 1, T, P + T, dtype=dtype),
               torch.arange(P, P + T)[None], *[torch.randn(1, kvh, P, d, dtype=dtype) for _ in range(2 * layers)])
    with torch.no_grad():
        # check_trace=False: transformers' cache bookkeeping makes two traces differ textually, not
        # in what they compute (tests compare the IR's logits with torch's at other lengths).
        traced = torch.jit.trace(_DecoderStep(lm).eval(), example, check_trace=False, strict=False)
        model = ov.convert_model(traced, example_input=example)
    pairs = state_names(layers)
    for port, name in zip(model.inputs, ["inputs_embeds", "attention_mask", "position_ids"] + [p for p, _ in pairs]):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, ["logits"] + [q for _, q in pairs]):
        port.get_tensor().set_names({name})
    model.reshape({"inputs_embeds": [1, -1, hidden], "attention_mask": [1, 1, -1, -1], "position_ids": [1, -1],
                   **{p: [1, kvh, -1, d] for p, _ in pairs}})  # batch 1
    make_stateful(model, pairs, kvh, d)
    return _float32_io(model, ["inputs_embeds", "attention_mask"], ["logits"])


def _float32_io(model, inputs: list[str], outputs: list[str]):
    """The model's float inputs and outputs as float32 (converted inside the graph): the graph is
    traced in float16 or bfloat16, callers feed and read numpy float32 whatever the plugin computes in."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    for name in inputs:
        ppp.input(name).tensor().set_element_type(ov.Type.f32)
    for name in outputs:
        ppp.output(name).tensor().set_element_type(ov.Type.f32)
    return ppp.build()


def convert_vision(clip):
    import openvino as ov

    dtype = next(clip.parameters()).dtype
    example = torch.randn(2, 3, 336, 336, dtype=dtype)
    with torch.no_grad():
        model = ov.convert_model(_VisionTower(clip).eval(), example_input=(example,))
    model.inputs[0].get_tensor().set_names({"pixel_values"})
    model.outputs[0].get_tensor().set_names({"features"})
    model.reshape({"pixel_values": [-1, 3, 336, 336]})
    return _float32_io(model, ["pixel_values"], ["features"])


def int4_group(hidden: int, intermediate: int) -> int:
    """128 (the published recipe) when it divides every input width; tiny test models use less."""
    g = INT4_GROUP
    while g > 1 and (hidden % g or intermediate % g):
        g //= 2
    return g


def convert(checkpoint: Path, scheme: str, out: Path, log=print) -> dict:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    import nncf
    import openvino as ov

    from .engines import TransformersEngine

    start = time.perf_counter()
    # int8/int4: float16, as OpenVINO's published IRs store weights: half the memory of a float32
    # copy (the full-size model: ~8 GB instead of ~16; ov.convert_model shares the tensors), and the
    # form whose NNCF-compressed weights the CPU plugin runs as int4/int8 products (decompression
    # from bf16 constants is not fused: a bf16 conversion ran its int4 layers as bf16 MatMuls).
    # bf16: bfloat16 constants, what the plugin computes in. From float16 ones it kept a converted
    # bf16 copy besides its packed weights: 22.2 GB of anonymous memory after the first inference
    # on an AMX CPU (the worker was OOM-killed on 24 GiB), three times the 7.4 GB of weights.
    weights = "bf16" if scheme == "bf16" else "fp16"
    torch_models = TransformersEngine(checkpoint, "bfloat16" if weights == "bf16" else "float16")
    torch_models.load()
    decoder, vision = convert_decoder(torch_models.lm), convert_vision(torch_models.clip)
    cfg = torch_models.lm.config
    meta = {"scheme": scheme, "checkpoint": str(checkpoint), "openvino": ov.__version__, "nncf": nncf.__version__,
            "converter_version": CONVERTER_VERSIONS[scheme], "layers": cfg.num_hidden_layers,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.hidden_size // cfg.num_attention_heads,
            "hidden": cfg.hidden_size, "decoder_weights": weights, "vision_weights": weights}
    del torch_models
    if scheme == "int4":
        g = int4_group(cfg.hidden_size, cfg.intermediate_size)
        decoder = nncf.compress_weights(decoder, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=g, ratio=1.0)
        meta["decoder_weights"] = f"int4_asym group {g} ratio 1.0 (nncf)"
    elif scheme == "int8":
        decoder = nncf.compress_weights(decoder, mode=nncf.CompressWeightsMode.INT8_ASYM)
        meta["decoder_weights"] = "int8_asym per channel (nncf)"
    if scheme != "bf16":
        vision = nncf.compress_weights(vision, mode=nncf.CompressWeightsMode.INT8_ASYM)
        meta["vision_weights"] = "int8_asym per channel (nncf)"
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(decoder, out / "decoder.xml", compress_to_fp16=weights == "fp16")
    ov.save_model(vision, out / "vision.xml", compress_to_fp16=weights == "fp16")
    meta["convert_s"] = time.perf_counter() - start
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")  # last: marks it complete
    log(f"converted in {meta['convert_s']:.1f}s: decoder {meta['decoder_weights']}, vision {meta['vision_weights']}")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi3v.bench.openvino_convert")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--scheme", choices=SCHEMES, required=True)
    p.add_argument("--out", required=True, help="IR folder to write")
    args = p.parse_args(argv)
    why = missing_extra()
    if why:
        print(why, file=sys.stderr)
        return 2
    convert(Path(args.model), args.scheme, Path(args.out), log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
