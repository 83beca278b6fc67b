"""Engines drive a family: batch EM (the reference) and stepwise EM (online)."""
