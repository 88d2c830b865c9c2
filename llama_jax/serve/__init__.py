"""`llama-jax serve`: an OpenAI-compatible HTTP server (api.py) over a continuous-batching engine
(engine.py).  See docs/serve.md."""
