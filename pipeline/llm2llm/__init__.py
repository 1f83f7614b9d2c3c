"""The pure parts of `sift loop` (LLM2LLM): failure selection, augmentation prompts and parsing
(augment.py), and how several teachers share a round (policy.py)."""
