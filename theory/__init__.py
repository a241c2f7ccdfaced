"""arca-lab theory: rank-dependent KL bounds for LoRA GRPO and credit-degeneracy predictions.

Pure sympy / numpy / scipy; imports without torch. The lab imports this package, never the reverse.
Import the submodules you need, e.g. ``from theory.softmax_kl import kl_bounds``.
"""
