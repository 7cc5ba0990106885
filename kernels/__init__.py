"""Quantized matmul kernels. Imports nothing from the solver: they see only codes, scales, zeros."""
