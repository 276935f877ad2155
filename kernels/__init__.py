"""Triton decode kernels, installed as `n2l.kernels`."""
