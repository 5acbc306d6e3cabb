"""Compute kernels under the engine: native decode kernels (ctypes), the decode linear, page-out."""
