"""Readable pure-torch references of every mmfast op: the oracles the kernels are tested against."""
