"""Aggregated streams: origin streams projected into partitions (`projector.py`), and readers."""
