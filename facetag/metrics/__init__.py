"""Scores of outputs against the truth: detector AP and, beside it, other metrics.

Plain functions of boxes, names and embeddings; nothing here runs a network, so both
training (validation) and the commands that evaluate (evaluate-detector) use them.
"""
