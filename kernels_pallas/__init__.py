"""Attention kernels. Each op has one API, a jnp reference implementation (also the CPU path) and
one file per accelerator backend."""
