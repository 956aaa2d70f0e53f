"""`lowrank-rlhf serve RUN`: a finished run as an OpenAI-compatible HTTP service on one quantized base.

    engine.py  the base, the run's adapters (base / sft / policy / best, chosen per request) and generation
    app.py     the FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, streaming, OpenAI errors
    feedback.py, feedback.html  /feedback: a person picks the better of two adapters' answers -> preference pairs
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_tokens: int = 512, feedback: tuple[str, str] | None = ("sft", "policy")) -> None:
    """Load the run and serve it with uvicorn until stopped (Ctrl-C / SIGTERM)."""
    import uvicorn

    from .app import build_app
    from .engine import Engine

    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    engine = Engine(Path(run_dir), max_tokens_limit=max_tokens)
    log.info("serving %s (models: %s) on http://%s:%d/v1", run_dir, ", ".join(engine.models), host, port)
    if feedback and feedback[0] in engine.models and feedback[1] in engine.models:
        log.info("preference page: http://%s:%d/feedback%s (%s vs %s, blind)", host, port,
                 "?key=KEY" if api_key else "", *feedback)
    else:
        feedback = None
    uvicorn.run(build_app(engine, api_key, feedback), host=host, port=port, log_level="warning")
