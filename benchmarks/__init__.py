"""fastroberta's benchmark suite: every Triton kernel and the whole training step against eager PyTorch and the
alternatives a user would otherwise pick, on the same device in the same run.

    python -m benchmarks kernels            # layer_norm, attention, mlm_cross_entropy  (CPU: smoke mode)
    python -m benchmarks e2e                # DeepSpeed ZeRO-2 training step: fastroberta vs HF transformers
    python -m benchmarks train              # two short trainer runs (Triton vs torch kernels), curves compared
    python -m benchmarks report             # benchmarks/results/SUMMARY.md (+ the README section)
    python -m benchmarks.pretraining_gain   # the bundled fine-tuning tasks: pretrained vs from scratch (CPU)
    pytest benchmarks/ --benchmark-only     # the kernel and e2e benchmarks through pytest-benchmark
    bash benchmarks/gpu_check.sh [DIR]      # all of it on one GPU within 8 minutes

Results land in ``benchmarks/results/<device>/``; ``benchmarks/results/README.md`` describes the layout.
Nothing here is imported by the package itself.
"""
