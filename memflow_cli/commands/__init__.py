"""One module per command: each parses its options and reports; the work happens below."""
