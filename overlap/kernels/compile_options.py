"""What every Triton launch of this project asks the compiler for, whatever the installed Triton's defaults.

    kernel[grid](..., **FP_FUSION)

FP_FUSION: a * b + c contracted into one fused multiply-add, Triton's default up to 3.9. Triton 3.9 warns that
the default becomes no contraction in 3.10; the kernels here were timed and parity-tested with contraction, so
they ask for it rather than change speed and roundings with whichever Triton a fresh install picks.
(torch.compile's generated kernels pass the same option themselves.)
"""

FP_FUSION = {"enable_fp_fusion": True}
