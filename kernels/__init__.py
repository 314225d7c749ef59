"""kif.kernels: fused Triton kernels, each with a torch reference and a dispatcher. Installed as
`kif.kernels` (pyproject maps this folder); the kernels land with the erasure milestone."""
