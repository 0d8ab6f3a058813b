"""Subscriptions: claiming partitions, calling handlers, acknowledging, start points."""
