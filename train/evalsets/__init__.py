"""Evaluation sets sift ships as data (general.jsonl); train/general_set.py loads and checks them.

A package only so that the wheel installs the files with train/, where the loader finds them.
"""
