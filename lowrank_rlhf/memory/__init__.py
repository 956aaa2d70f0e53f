"""Memory: the pure per-phase estimate and plan, and the run-time micro-batch runner that recovers from OOM."""
