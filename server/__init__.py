"""An OpenAI-compatible HTTP server over the engine (scripts/serve.py starts it).

protocol.py: the wire format (request models, response bodies, OpenAI-style errors);
engine_loop.py: the one thread that owns the LLM; metrics.py: Prometheus text; app.py: the routes.
"""
