"""LoRA shrink/expand ops: Triton kernels for CUDA, a pure-torch reference, a fast CPU path.

The engine imports only this package's public functions, never triton itself.
"""
