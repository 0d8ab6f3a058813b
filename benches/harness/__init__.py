"""Side-by-side benchmark harness: depeche-db 0.13.1 against depeche-rs on the same data."""
