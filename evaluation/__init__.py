"""Retrieval evaluation (MQAR, RULER-style needles), held-out perplexity and the replication study."""
