"""A small HTTP client for the primer API (what `primer submit` and `primer jobs` use)."""
from __future__ import annotations

import httpx

from core.settings import settings


class ClientError(Exception):
    """The API said no (4xx/5xx) or could not be reached; the message says what it said."""


def local_key() -> str | None:
    """PRIMER_API_KEY, else the admin key `primer serve` wrote for this machine."""
    if settings().api_key:
        return settings().api_key
    path = settings().cache_dir / "api_key"
    return path.read_text().strip() if path.exists() else None


class Client:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 30):
        key = key or local_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url or settings().api_url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the primer API at {self.http.base_url}: {e}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            if isinstance(detail, list):  # 422: one line per field
                detail = "\n".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
            raise ClientError(f"{method} {path}: HTTP {response.status_code}: {detail}")
        return response

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/jobs", json=spec, headers=headers).json()

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{job_id}").json()

    def jobs(self, status: str | None = None, limit: int = 50) -> list[dict]:
        params = {"limit": limit, **({"status": status} if status else {})}
        return self.request("GET", "/jobs", params=params).json()["jobs"]

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def results(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{job_id}/results").json()

    def prompts(self, job_id: str) -> list[dict]:
        return self.request("GET", "/prompts", params={"job": job_id}).json()["prompts"]

    def download(self, prompt_id: str, fmt: str = "safetensors") -> bytes:
        return self.request("GET", f"/prompts/{prompt_id}", params={"format": fmt}).content

    # admin keys only
    def create_key(self, name: str, admin: bool = False) -> dict:
        """The new key, with its secret (shown this once)."""
        return self.request("POST", "/keys", json={"name": name, "admin": admin}).json()

    def keys(self) -> list[dict]:
        return self.request("GET", "/keys").json()["keys"]

    def revoke_key(self, key_id: str) -> dict:
        return self.request("DELETE", f"/keys/{key_id}").json()
