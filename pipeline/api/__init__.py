"""The customer-service chat API (FastAPI): OpenAI-compatible chat completions, conversations, operations.

Entry points: `pipeline.api.app.create_app(...)` and `pipeline.api.app.run_server(...)`.
"""
