"""What `phi3v bench` can measure: the variant names (light, so `phi3v bench --help` lists them)."""

VARIANTS = {  # name -> (engine, dtype, quantization)
    "phi3v-bf16": ("phi3v", "bfloat16", None),
    "phi3v-int8": ("phi3v", "bfloat16", "int8"),
    "phi3v-int4": ("phi3v", "bfloat16", "int4"),
    "phi3v-fp32": ("phi3v", "float32", None),
    "transformers-bf16": ("transformers", "bfloat16", None),
}
DEFAULT_VARIANTS = ("transformers-bf16", "phi3v-bf16", "phi3v-int8", "phi3v-int4")
VISION_VARIANTS = ("transformers-bf16", "phi3v-bf16")  # vision tower is bf16 in every phi3v variant
