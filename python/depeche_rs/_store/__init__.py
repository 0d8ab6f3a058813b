"""The message store: where messages are written and read (`MessageStore`, `Storage`)."""
