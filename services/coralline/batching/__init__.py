"""Batched verification across sessions: a preallocated KV pool (pool.py), the ragged forward of
many sessions' trees and prefill chunks in one pass (forward.py), the scheduler that gathers
them (scheduler.py) and the cost model of a batched forward (costs.py)."""
