"""ddtree: the algorithms behind ddtree-vllm, independent of vLLM.

Everything under this package imports torch (and triton, where a kernel needs it) only. vLLM glue
lives in the overlays under ``patches/``, which call into this package.
"""

__version__ = "0.1.0"
