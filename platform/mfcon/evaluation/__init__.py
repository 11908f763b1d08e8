"""Evaluation: verification metrics, trial scoring, score normalisation and verdicts (pure NumPy/torch)."""
