"""Score: fidelity to the uncompressed run and task accuracy, statistics, thresholds, the recommendation.

Only ``fidelity`` needs torch (first-token logits); thresholds, statistics and the recommendation read
results dictionaries.
"""
