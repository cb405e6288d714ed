"""Evaluation: distances to a reference distribution, reports and plots."""
