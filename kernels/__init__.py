"""Triton kernels, one file per op (installed as rematch_fast.kernels). Leaves: they import nothing from
rematch_fast; engines reach them through the custom ops of rematch_fast.ops and rematch_fast.similarity."""
