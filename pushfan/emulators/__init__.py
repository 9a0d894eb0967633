"""FCM and APNs emulators that speak the real protocols, for tests, benchmarks and ``make run``.

FCM and APNs cannot be reached from where pushfan is developed, so pushfan ships servers
that answer as they do: HTTP/2 over TLS, the real JSON error bodies and status codes,
Retry-After, OAuth2 (FCM) and ES256 provider tokens (APNs), ``apns-id`` echo. Both are
scriptable (dead tokens, failure rates, latency, outages) and keep a delivery log, so a
test can check that every token was delivered exactly once.

:func:`pushfan.emulators.runner.start_emulators` starts both in the running event loop.
"""
