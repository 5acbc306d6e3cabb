"""Quantization: weight-only int8/int4 and W8A8 (w8a8_*: int8 activations for prefill and vision), the
quantized layers and quantized checkpoints."""
