"""Serve a detector over HTTP (FastAPI + uvicorn) with a web page: see ``serve.app``."""
