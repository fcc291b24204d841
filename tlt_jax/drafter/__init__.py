"""Drafter training: the EAGLE loss, a jitted update step, the online data buffer, the spot trainer and the
offline warm-up."""
