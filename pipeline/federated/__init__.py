"""Federated LoRA's machinery for `sift federate` (pipeline/stages/federate.py): the Flower apps
(apps.py) and the federation's state on disk (state.py)."""
