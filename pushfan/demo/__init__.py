"""The demo of ``pushfan up``: :mod:`~pushfan.demo.seed` (the population),
:mod:`~pushfan.demo.scenario` (what it publishes and checks), :mod:`~pushfan.demo.summary`
(the per-platform account)."""
