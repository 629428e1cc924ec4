"""Serving the active model version through OpenAI-compatible endpoints.

holder: which version is served and the hot swap; generation: sampling and decoding; guard: the
pending-request output guard (a stopgap, not erasure); endpoint: glue shared by the routers; metrics:
Prometheus. Only `holder` and the model code import torch, and only `unlearn serve` (serve_model=True)
imports holder.
"""
