"""Evaluation beyond exact match: what jobs/evaluate.py reports for speech."""
