"""Speculative decoding: proposers (n-gram, draft model, MTP), the lossless rejection rule, metrics."""
