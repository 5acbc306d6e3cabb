"""`phi3v bench`: phi3v vs transformers on the same full-size weights, in the same run.

Each variant (phi3v bf16 / int8 / int4, transformers bf16, OpenVINO bf16 / int8 / int4) runs in its
own child process, one after the other, so load time and peak RSS are measured cleanly and two big
models never share memory:

    runner.py    prepares checkpoints (random full-size one if none is given, quantized copies),
                 starts the workers, collects their JSON
    worker.py    `python -m phi3v.bench.worker ...`: load one variant, run the workloads, print JSON
    workloads.py the timed workloads, written once against the small Engine interface
    engines.py   phi3v's engine and the transformers one (Phi3ForCausalLM + CLIPVisionModel built
                 from the same tensors, as a user would assemble them)
    openvino_convert.py  the same tensors -> OpenVINO IR (NNCF-compressed), cached per checkpoint+scheme
    openvino_engine.py   the OpenVINO peer behind the same interface; what OpenVINO ran (precisions)
    report.py    medians with min-max, ratios vs transformers, the table, the JSON file
    memory.py    RSS readings from /proc
    variants.py  the variant names (what `phi3v bench --help` lists, without importing torch)
"""
