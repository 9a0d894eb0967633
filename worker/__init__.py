"""The fanout worker: consume job, resolve audience pages, fetch tokens, send, report, commit."""
