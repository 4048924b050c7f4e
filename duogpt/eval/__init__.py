"""Evaluation: perplexity over non-overlapping windows, fidelity to the dense model on sampled
text (`--ppl self`), and zero-shot tasks through lm-evaluation-harness."""

from duogpt.eval.perplexity import perplexity

__all__ = ["perplexity"]
