"""The Triton compile options the kernels' speed depends on, passed explicitly at every launch (and by
``benchmarks/sm90.py``'s static compile, which records them).

``enable_fp_fusion``: FMA contraction (``a * b + c`` as one FFMA). Triton 3.9 warns that its default turns off in
3.10; the kernels' instruction counts (``benchmarks/results/sm90/static.md``) and their rounding were measured
with it on. Triton 3.6 takes the same launch keyword, and the interpreter drops it.
"""
COMPILE_OPTIONS = {"enable_fp_fusion": True}
