"""Experimental parts, as in depeche-db: they may change without notice."""
