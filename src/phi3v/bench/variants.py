"""What `phi3v bench` can measure: the variant names (light, so `phi3v bench --help` lists them)."""

VARIANTS = {  # name -> (engine, dtype, quantization)
    "phi3v-bf16": ("phi3v", "bfloat16", None),
    "phi3v-int8": ("phi3v", "bfloat16", "int8"),
    "phi3v-int4": ("phi3v", "bfloat16", "int4"),
    "phi3v-w8a8": ("phi3v", "bfloat16", "w8a8"),  # int8 activations in prefill and its (int8) vision tower
    "phi3v-fp32": ("phi3v", "float32", None),
    "transformers-bf16": ("transformers", "bfloat16", None),
    # OpenVINO IR of the same weights (bench/openvino_convert.py; the `openvino` extra): the scheme
    # names the decoder's weights; int8/int4 have an int8 vision tower, as OpenVINO publishes them.
    "openvino-bf16": ("openvino", "bfloat16", "bf16"),
    "openvino-int8": ("openvino", "bfloat16", "int8"),
    "openvino-int4": ("openvino", "bfloat16", "int4"),
}
OPENVINO_PEERS = {"openvino-bf16": "phi3v-bf16", "openvino-int8": "phi3v-int8", "openvino-int4": "phi3v-int4"}
# OpenVINO's are skipped with a note when the `openvino` extra is not installed
DEFAULT_VARIANTS = ("transformers-bf16", "phi3v-bf16", "phi3v-int8", "phi3v-int4", "phi3v-w8a8", "openvino-bf16",
                    "openvino-int8", "openvino-int4")
# vision tower is bf16 in phi3v's bf16/int8/int4 variants (w8a8's is int8); OpenVINO's differs per variant
VISION_VARIANTS = ("transformers-bf16", "phi3v-bf16", "phi3v-w8a8", "openvino-bf16", "openvino-int8", "openvino-int4")
