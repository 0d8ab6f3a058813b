"""Aggregated streams: origin streams projected into partitions, and their readers."""
