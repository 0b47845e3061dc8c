"""Benchmarks (`snd bench precompute|distill|eval`): the real pipeline code, timed, as JSON."""
