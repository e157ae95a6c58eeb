"""Evaluation of the reproduction: grading (last \\boxed{} + math-verify), Avg@k / pass@k / maj@k with bootstrap
CIs, sampling backends (vLLM on GPU, transformers on CPU) and the resumable run behind ``scripts/evaluate.py``.

Submodules import verl, torch and vLLM only where they need them (``grading`` and ``metrics`` are light).
"""
