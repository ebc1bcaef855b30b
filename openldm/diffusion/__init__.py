"""Noise schedules, denoisers, samplers and noise."""
