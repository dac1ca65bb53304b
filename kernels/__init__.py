"""Triton kernels, one file per op (installed as rematch_fast.kernels). None has landed yet."""
