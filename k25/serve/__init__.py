"""The OpenAI-compatible server: request handling (engine.py), the FastAPI app (app.py), checkpoint loading."""
