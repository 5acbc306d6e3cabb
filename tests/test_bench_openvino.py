"""OpenVINO as a `phi3v bench` peer (bench/openvino_convert.py, openvino_engine.py, the report) on a tiny
checkpoint: the IR computes what transformers computes, conversion is cached by checkpoint and
scheme, the int4 recipe is what OpenVINO publishes, a worker run measures the plan and reports what
OpenVINO executed, and the report compares each phi3v variant with its OpenVINO peer.

Needs the `openvino` extra (openvino + nncf; in the test extra: the wheels install in seconds and
leave torch alone); without it these tests skip, saying so.  The skip-with-a-note behaviour of
the runner is tested without the extra.

Tolerance of the IR vs transformers (float32 both, INFERENCE_PRECISION_HINT f32): the IR stores
weights in fp16 (11-bit mantissa) and the plugin may keep the KV state in a lower precision, so
logits agree to 2% of their largest magnitude; a wrong mask, position or cache would be off by
the logits' own scale."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import SHORT_ROPE
from phi3v.bench import runner
from phi3v.bench.openvino_convert import EXTRA_HINT, ensure_ir, ir_folder, missing_extra
from phi3v.bench.report import build_report, markdown_table

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # tracing transformers' Python
needs_openvino = pytest.mark.skipif(bool(missing_extra()), reason=f"OpenVINO peer not testable: {missing_extra()}")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    # hidden 128: phi3v's int4 (group 128) and OpenVINO's recipe (group 128) both apply; the
    # LongRoPE boundary at SHORT_ROPE tokens, so a few hundred tokens take the long factors
    return tiny_checkpoint(num_crops=2, hidden_size=128, intermediate_size=256,
                           original_max_position_embeddings=SHORT_ROPE)


@pytest.fixture(scope="module")
def irs(checkpoint, tmp_path_factory):
    if missing_extra():
        pytest.skip(missing_extra())
    from phi3v.bench.openvino_convert import convert

    data = tmp_path_factory.mktemp("bench-data")
    made = {"int4": ensure_ir(checkpoint, "int4", data, log=lambda m: None)}  # the child-process path
    bf16 = ir_folder(checkpoint, "bf16", data)  # in this process (saves a child's imports)
    made["bf16"] = (bf16, convert(checkpoint, "bf16", bf16, log=lambda m: None)["convert_s"])
    return data, made


@needs_openvino
@pytest.mark.slow
def test_the_ir_computes_what_transformers_computes(checkpoint, irs):
    from phi3v.bench.engines import TransformersEngine
    from phi3v.bench.openvino_engine import OpenVINOEngine

    _, made = irs
    ov = OpenVINOEngine(checkpoint, made["bf16"][0], threads=2, config={"INFERENCE_PRECISION_HINT": "f32"})
    ov.load()
    ref = TransformersEngine(checkpoint, "float32")
    ref.load()
    # The bf16 IR's constants and graph are bfloat16, so the plugin computes in bf16 whatever the
    # hint: logits within 5% of the largest (2.3% measured on this model); a wrong mask, position,
    # RoPE factor or cache state is off by far more.
    tol = 0.05
    ids = [1, 5, 900, 33, 7, 1000, 40, 12, 13]  # 9 tokens: not the trace's example lengths
    ov.reset()
    with torch.no_grad():
        for got, want_ids in ((ov.step(ov._embed_ids(torch.tensor(ids))), ids),
                              (ov.step(ov._embed_ids(torch.tensor([77]))), ids + [77]),  # one decode step
                              (ov.step(ov._embed_ids(torch.tensor([78, 79]))), ids + [77, 78, 79])):
            want = ref.lm(input_ids=torch.tensor([want_ids])).logits[0, -1]
            assert (got - want).abs().max() <= tol * want.abs().max()
        # a prompt past the RoPE boundary: the IR switches to the long factors as transformers does
        long_ids = [1] + torch.randint(100, 32000, (SHORT_ROPE + 40,), generator=torch.Generator().manual_seed(1)).tolist()
        ov.reset()
        got = ov.step(ov._embed_ids(torch.tensor(long_ids)))
        want = ref.lm(input_ids=torch.tensor([long_ids])).logits[0, -1]
        assert (got - want).abs().max() <= tol * want.abs().max()
        crops = torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(0))
        want = ref.encode_crops(crops)
        assert (ov.encode_crops(crops) - want).abs().max() <= tol * want.abs().max()


@needs_openvino
def test_conversion_is_cached_by_checkpoint_and_scheme(checkpoint, irs, monkeypatch):
    data, made = irs
    assert made["bf16"][1] is not None and made["int4"][1] is not None  # converted (seconds recorded)
    assert made["bf16"][0] != made["int4"][0]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("converted again"))
    assert ensure_ir(checkpoint, "int4", data) == (made["int4"][0], None)
    meta = json.loads((made["int4"][0] / "meta.json").read_text())
    assert meta["decoder_weights"] == "int4_asym group 128 ratio 1.0 (nncf)"
    assert meta["vision_weights"].startswith("int8_asym")
    # A rewritten weight file is a different checkpoint: a new folder.
    weights = next(checkpoint.glob("*.safetensors"))
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert ir_folder(checkpoint, "int4", data) != made["int4"][0]
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


@needs_openvino
@pytest.mark.slow
def test_a_worker_run_measures_the_plan_and_reports_what_ran(checkpoint, irs, tmp_path):
    from phi3v.bench import worker

    out = tmp_path / "ov.json"
    assert worker.main(["--engine", "openvino", "--model", str(checkpoint), "--ir", str(irs[1]["int4"][0]),
                        "--variant", "openvino-int4", "--quick", "--threads", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for metric in ("vision_1crops_s", "vision_5crops_s", "ttft_1img_nc4_s", "prefill_128_tok_s",
                   "decode_short_tok_s", "decode_ctx512_tok_s"):
        assert res["metrics"][metric] and all(v > 0 for v in res["metrics"][metric]), metric
    rt = res["runtime"]
    assert "INFERENCE_PRECISION_HINT" in rt["decoder"] and "KV_CACHE_PRECISION" in rt["decoder"]
    assert any(k.startswith("FullyConnected:u4") for k in rt["decoder_nodes"])  # int4 weights did run
    # the plugin fused attention with the KV cache in every layer (so KV_CACHE_PRECISION applies)
    assert sum(rt["kv_cache_nodes"].values()) == json.loads((irs[1]["int4"][0] / "meta.json").read_text())["layers"]
    assert len(rt["kv_cache_nodes"]) == 1  # one precision (the CPU plugin's default: u8 on AVX-512 CPUs)

    phi = {"load_s": 1.0, "rss_after_load_gib": 1.0, "peak_rss_gib": 1.0,
           "metrics": {m: [v[0] / 2 if m.endswith("_tok_s") else v[0] * 2] for m, v in res["metrics"].items()}}
    report = build_report({"phi3v-int4": phi, "openvino-int4": res}, {})
    pair = report["ratios_vs_openvino"]["phi3v-int4 vs openvino-int4"]
    assert pair["decode_short_tok_s"] == pytest.approx(0.5) and pair["ttft_1img_nc4_s"] == pytest.approx(0.5)
    assert report["variants"]["openvino-int4"]["runtime"] == rt
    table = markdown_table(report)
    assert "| phi3v-int4 vs openvino-int4 |" in table and "| decode_short_tok_s | 0.50x |" in table
    assert "openvino-int4: OpenVINO" in table and "KV cache in " in table


def test_without_the_extra_the_variants_are_skipped_with_a_note(checkpoint, tmp_path, monkeypatch):
    from phi3v.bench import openvino_convert

    monkeypatch.setattr(openvino_convert, "missing_extra", lambda: f"openvino, nncf not installed: {EXTRA_HINT}")
    monkeypatch.setattr(runner, "read_bandwidth_gbs", lambda threads: 1.0)
    report = runner.run_benchmark(str(checkpoint), data_dir=tmp_path, variants=["openvino-int4"], quick=True,
                                  log=lambda m: None)
    assert report["variants"] == {}
    assert report["env"]["skipped"] == {"openvino-int4": "openvino, nncf not installed: pip install 'phi3v[openvino]'"}
    assert "- openvino-int4 skipped: openvino, nncf not installed: pip install 'phi3v[openvino]'" in report["table"]
