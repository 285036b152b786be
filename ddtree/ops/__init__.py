"""Kernels (Triton, with torch references and CPU fallbacks) used by the ddtree algorithms."""
