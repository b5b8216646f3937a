"""Attacks layer: membership inference attacks as SQL (or Python) over the store, and their metrics.

May import `store`, `spec`, `errors`; never the runner or torch. An attack turns signals into per-sample
scores (higher = more likely member); `metrics` alone turns scores into numbers.
"""
