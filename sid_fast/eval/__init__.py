"""Evaluation: distances to a reference distribution, scores, plots and reports."""
