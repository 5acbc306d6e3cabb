"""Weight-only int8/int4 quantization: the quantized layers and quantized checkpoints."""
