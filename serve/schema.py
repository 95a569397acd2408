"""The event API's request and response models (pydantic) and what is derived from them: the
validation error message and the OpenAPI entries of the two event routes.

The models are the single statement of what a valid request is: the event routes validate bodies
with them (`serve.event_routes`) and the `/docs` schema is generated from them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints

MAX_ID_LENGTH = 256  # characters of a string id; longer ones are refused (422)
INT64 = 2**63
# Integer ids are int64 (as the item map and score store them); string ids 1..MAX_ID_LENGTH characters.
Id = (
    Annotated[StrictInt, Field(ge=-INT64, lt=INT64)]
    | Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
)


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: Id = Field(description="The session's id: an integer or a string (max 256 characters).")
    item_id: Id = Field(description="The item the user interacted with, in the model's id type.")
    k: StrictInt | None = Field(
        None, ge=1, description="How many recommendations (1..the model's top-k; default: its top-k)."
    )


class EventOut(BaseModel):
    session_id: Id
    item_id: Id
    items: list[Id] = Field(description="Top-k item ids, best first (empty: no known item yet).")
    scores: list[float] = Field(description="Their scores (raw logits of the model).")
    model: str = Field(description="Export id of the model that answered.")
    unknown_item: bool = Field(description="The model does not know item_id: the state was left unchanged.")


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, description="Events, applied in list order per session.")


class BatchOut(BaseModel):
    results: list[EventOut]


def validation_error(errors: list[dict]) -> dict:
    """The 422 body for pydantic's `errors()`: the field and the problem, never the input (it may be huge)."""
    detail = [
        {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))[:200]} for e in errors[:10]
    ]
    where = ".".join(x for x in detail[0]["loc"] if x != "body" and not x.isdigit()) if detail else ""
    head = f"{where or 'body'}: {detail[0]['msg']}" if detail else "unreadable body"
    return {"error": f"invalid request: {head}", "detail": detail}


EVENT_ROUTES = {
    "/v1/events": (
        EventIn,
        EventOut,
        "Apply one event to its session",
        "Advances the session's state by the event and answers its top-k after it.",
    ),
    "/v1/events:batch": (
        BatchIn,
        BatchOut,
        "Apply many events",
        "Sessions in any mix; each session's events are applied in list order. One result per event, in order.",
    ),
}


def add_event_routes_to_openapi(schema: dict, guarded: bool) -> dict:
    """Document the event routes (served outside FastAPI's router) in FastAPI's generated schema."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    components["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "detail": {"type": "array", "items": {"type": "object"}}},
        "required": ["error"],
    }

    def body(model) -> dict:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}

    for path, (request, response, summary, description) in EVENT_ROUTES.items():
        for model in (request, response):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        responses = {
            "200": {"description": "The top-k after the event", "content": body(response)},
            "413": {"description": "Body too large", **error},
            "422": {"description": "Malformed request", **error},
            "503": {"description": "State store or model failed", **error},
        }
        if guarded:
            responses["401"] = {"description": "Missing or wrong bearer token", **error}
        schema.setdefault("paths", {})[path] = {
            "post": {
                "summary": summary,
                "description": description,
                "operationId": path.strip("/").replace("/", "_").replace(":", "_"),
                "requestBody": {"required": True, "content": body(request)},
                "responses": responses,
                **({"security": [{"bearer": []}]} if guarded else {}),
            }
        }
    if guarded:
        components_root = schema["components"]
        components_root.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    return schema
