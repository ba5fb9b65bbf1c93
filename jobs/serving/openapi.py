"""The OpenAPI 3.1 description of the public HTTP API, built from the same pydantic models that validate requests
(jobs/serving/api.py), so the description cannot drift from what the server accepts. Served at /openapi.json
(unauthenticated: it holds no data) and read by the schema-driven fuzz (tests/cluster/test_serve_chaos.py).

Responses list every status the server may answer (docs/SERVING.md, "Limits and errors") with the OpenAI error
body; success bodies are described loosely (objects) — the OpenAI client tests pin their exact shape.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from jobs.serving.api import ChatRequest, CompletionRequest

_ERROR = {"$ref": "#/components/schemas/Error"}
_SECURITY = [{"bearer": []}]


def _responses(*statuses: int, stream: bool = False) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if stream:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    out: dict[str, Any] = {"200": {"description": "success", "content": ok}}
    for s in statuses:
        out[str(s)] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
    return out


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


@cache
def openapi_spec() -> dict[str, Any]:
    """The description as a JSON-ready dict (cached: it depends on code only)."""
    schemas: dict[str, Any] = {}
    for model in (CompletionRequest, ChatRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Error"] = {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    }
    completion_errors = (400, 401, 404, 408, 413, 429, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": "raygpt", "version": "1", "description": "OpenAI-compatible completions (docs/SERVING.md)"},
        "paths": {
            "/v1/completions": {"post": {"operationId": "completions", "security": _SECURITY,
                                         "requestBody": _body("CompletionRequest"),
                                         "responses": _responses(*completion_errors, stream=True)}},
            "/v1/chat/completions": {"post": {"operationId": "chat_completions", "security": _SECURITY,
                                              "requestBody": _body("ChatRequest"),
                                              "responses": _responses(*completion_errors, stream=True)}},
            "/v1/models": {"get": {"operationId": "list_models", "security": _SECURITY,
                                   "responses": _responses(401)}},
            "/v1/models/{name}": {"get": {"operationId": "get_model", "security": _SECURITY,
                                          "parameters": [{"name": "name", "in": "path", "required": True,
                                                          "schema": {"type": "string"}}],
                                          "responses": _responses(401, 404)}},
            "/healthz": {"get": {"operationId": "healthz", "responses": _responses(503)}},
        },
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
