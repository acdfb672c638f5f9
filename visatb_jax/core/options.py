"""The choices of λ's options, in one place and without importing jax.

Read by the λ functions (`balancing`, `bootstrap`), the config check and the `balance` command,
whose `--help` must not pay for importing jax.
"""

# The forms of the preparation models and of D (docs/method.md §2, §4, §7).
FORMS = ("real", "precise", "base")
# What to do about a denominator that is not clearly positive: raise, or warn and mask.
ON_DEGENERATE = ("error", "warn")
# "none": the paper's λ; "evidence": each component shrunk toward the mean by its bootstrap
# z-score first (docs/method.md §14).
SHRINKAGE = ("none", "evidence")
# A unit whose own-data gain interval contains 0: warn, stop, or leave its column of C out.
ON_NOISY_GAIN = ("warn", "error", "drop")
