"""Pure filters for instruction data: quality heuristics, exact ROUGE-L dedup, instance checks.

Nothing here reads or writes files or imports from `pipeline/`; the stages call these
functions and write what they return.
"""
