"""Database queries, one module per resource. Functions flush but never commit: the request or task commits."""
