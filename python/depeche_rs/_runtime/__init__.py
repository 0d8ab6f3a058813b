"""The live runtime: LISTEN, notifications dispatched to passes, the poll, reconnection."""
