"""sift: instruction data from a teacher model, filtered and accounted for, and a student tuned on it."""

__version__ = "0.1.0"
