"""Triton kernels, one file per op (installed as rematch_fast.kernels); engines reach them through rematch_fast.ops."""
