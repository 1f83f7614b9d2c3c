"""The prompt templates, shipped as package data so an installed sift finds them (see pipeline/teachers/prompts.py)."""
