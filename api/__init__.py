"""primer's HTTP API (FastAPI): `uvicorn api.app:create_app --factory`."""
