"""The OpenAPI 3.1 description of the admin API (`GET /admin/openapi.json`)."""

from __future__ import annotations

from typing import Any

from gateway.config.types import MAX_QUANTITY
from gateway.tenant_ops import TenantChanges


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the admin API."""
    problem_ref = {"$ref": "#/components/schemas/Problem"}

    def answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
        media = "application/json" if schema is not problem_ref else "application/problem+json"
        body = {"content": {media: {"schema": schema}}} if schema else {}
        return {"description": description, **body}

    def json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
        return {"required": required, "content": {"application/json": {"schema": schema}}}

    tenant_ref = {"$ref": "#/components/schemas/Tenant"}
    key_ref = {"$ref": "#/components/schemas/ApiKey"}
    id_param = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    meter_param = {"name": "meter", "in": "path", "required": True, "schema": {"type": "string"}}
    # Every /admin/ operation may answer these; those with a body or a query more.
    denied = {
        "401": answer("missing or wrong admin token", problem_ref),
        "403": answer("the admin token's environment variable is not set", problem_ref),
    }
    errors = {**denied, "404": answer("unknown tenant (or meter)", problem_ref)}
    with_body = {
        **errors,
        "400": answer("the body is not JSON, or a number is out of range", problem_ref),
        "422": answer("the body is not an object, or a field is invalid", problem_ref),
    }
    quantity = {"type": "integer", "maximum": MAX_QUANTITY}
    limit_param = {
        "name": "limit", "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    }  # fmt: skip
    changes = TenantChanges.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = changes.pop("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {"title": "Quota gateway admin API", "version": "1"},
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "TenantChanges": changes,
                **nested,
                "Tenant": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "name": {"type": ["string", "null"]},
                        "plan": {"type": "string"},
                        "status": {"type": "string"},
                        "status_changed_at": {"type": "string", "format": "date-time"},
                        "billing_anchor": {"type": ["string", "null"], "format": "date-time"},
                        "stripe_customer": {"type": ["string", "null"]},
                        "stripe_subscription": {"type": ["string", "null"]},
                        "disabled": {"type": "boolean"},
                        "overrides": {
                            "type": "object",
                            "additionalProperties": {"$ref": "#/components/schemas/LimitConfig"},
                        },
                    },
                },
                "ApiKey": {
                    "type": "object",
                    "properties": {
                        "prefix": {"type": "string"},
                        "tenant": {"type": "string"},
                        "name": {"type": ["string", "null"]},
                        "key": {"type": "string", "description": "only in the creation answer"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "revoked_at": {"type": ["string", "null"], "format": "date-time"},
                        "last_used_at": {"type": ["string", "null"], "format": "date-time"},
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                },
            },
        },  # fmt: skip
        "security": [{"admin": []}],
        "paths": {
            "/admin/tenants": {
                "get": {
                    "summary": "List tenants, ordered by id",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        **denied,
                        "400": answer("limit is not an integer from 1 to 1000", problem_ref),
                        "200": answer(
                            "a page of tenants",
                            {
                                "type": "object",
                                "properties": {
                                    "tenants": {"type": "array", "items": tenant_ref},
                                    "next": {"type": ["string", "null"]},
                                },
                            },
                        ),
                    },
                }
            },
            "/admin/tenants/{id}": {
                "parameters": [id_param],
                "get": {
                    "summary": "One tenant",
                    "responses": {"200": answer("the tenant", tenant_ref), **errors},
                },
                "put": {
                    "summary": "Create a tenant, or change the fields given",
                    "requestBody": json_body({"$ref": "#/components/schemas/TenantChanges"}),
                    "responses": {
                        "200": answer("changed", tenant_ref),
                        "201": answer("created", tenant_ref),
                        **with_body,
                    },
                },
                "delete": {
                    "summary": "Disable a tenant",
                    "responses": {"200": answer("disabled", tenant_ref), **errors},
                },
            },
            "/admin/tenants/{id}/api-keys": {
                "parameters": [id_param],
                "post": {
                    "summary": "Create an API key (the key is shown once)",
                    "requestBody": json_body(
                        {"type": "object", "properties": {"name": {"type": "string"}}},
                        required=False,
                    ),
                    "responses": {"201": answer("the new key", key_ref), **with_body},
                },
                "get": {
                    "summary": "The tenant's API keys (never the keys themselves)",
                    "responses": {
                        "200": answer(
                            "the keys",
                            {
                                "type": "object",
                                "properties": {"api_keys": {"type": "array", "items": key_ref}},
                            },
                        ),
                        **denied,
                    },
                },
            },
            "/admin/tenants/{id}/usage": {
                "get": {
                    "summary": "The tenant's meters now: used, limit, remaining, state",
                    "parameters": [id_param],
                    "responses": {"200": answer("the usage view"), **errors},
                }
            },
            "/admin/tenants/{id}/usage/{meter}/hourly": {
                "get": {
                    "summary": "The meter's hourly history from the ledger",
                    "parameters": [
                        id_param,
                        meter_param,
                        *(
                            {
                                "name": name,
                                "in": "query",
                                "schema": {"type": "string", "format": "date-time"},
                                "description": "with a time zone; 1970 to 9998, since before "
                                "until and at most 93 days apart (default: the last 24 h)",
                            }
                            for name in ("since", "until")
                        ),
                    ],
                    "responses": {
                        "200": answer(
                            "{tenant, meter, since, until, hours: [{hour, quantity, events}]}"
                        ),
                        "400": answer("bad time range", problem_ref),
                        **errors,
                    },
                }  # fmt: skip
            },
            "/admin/tenants/{id}/gauges/{meter}": {
                "put": {
                    "summary": "Set a gauge's level",
                    "parameters": [id_param, meter_param],
                    "requestBody": json_body(
                        {
                            "type": "object",
                            "properties": {"value": {**quantity, "minimum": 0}},
                            "required": ["value"],
                        }
                    ),
                    "responses": {"200": answer("the usage view"), **with_body},
                }
            },
            "/admin/tenants/{id}/meters/{meter}/reset": {
                "post": {
                    "summary": "Start the meter's current period again from 0",
                    "parameters": [id_param, meter_param],
                    "responses": {"200": answer("the usage view"), **errors},
                }
            },
            "/admin/tenants/{id}/credits": {
                "post": {
                    "summary": "Add to the tenant's quota of a counter for its current period",
                    "parameters": [id_param],
                    "requestBody": json_body(
                        {
                            "type": "object",
                            "properties": {
                                "meter": {"type": "string"},
                                "quantity": {
                                    **quantity,
                                    "minimum": -MAX_QUANTITY,
                                    "not": {"const": 0},
                                    "description": "negative takes back earlier credit",
                                },
                            },
                            "required": ["meter", "quantity"],
                        }
                    ),
                    "responses": {
                        "201": answer("the credit, its period and the period's total"),
                        **with_body,
                    },
                }
            },
            "/admin/anomalies": {
                "get": {
                    "summary": "Usage anomalies of this hour and the last, largest first",
                    "parameters": [limit_param],
                    "responses": {
                        "200": answer(
                            "{since, anomalies: [{tenant, meter, used, period_start, "
                            "baseline_median, threshold, ratio, detected_at}]}"
                        ),
                        "400": answer("bad limit", problem_ref),
                        **denied,
                    },
                }
            },
            "/admin/notifications": {
                "get": {
                    "summary": "Webhook notifications, newest first",
                    "parameters": [
                        limit_param,
                        {"name": "tenant", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"enum": ["pending", "delivered", "dead"]},
                        },
                    ],
                    "responses": {
                        "200": answer(
                            "{notifications: [{signal, type, tenant, meter, endpoint, "
                            "state, attempts, created_at, delivered_at, last_error}]}"
                        ),
                        "400": answer("bad limit or state", problem_ref),
                        **denied,
                    },
                }
            },
            "/admin/notifications/{signal}/requeue": {
                "post": {
                    "summary": "Deliver a dead-lettered notification again",
                    "parameters": [
                        {
                            "name": "signal",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": json_body(
                        {
                            "type": "object",
                            "required": ["endpoint"],
                            "properties": {"endpoint": {"type": "string"}},
                        }
                    ),
                    "responses": {
                        "200": answer("{signal, endpoint, state: pending}"),
                        "400": answer("the body is not JSON", problem_ref),
                        "404": answer(
                            "no dead notification of this signal to that endpoint", problem_ref
                        ),
                        "422": answer("the body is not {endpoint}", problem_ref),
                        **denied,
                    },
                }
            },
            "/admin/api-keys/{prefix}": {
                "delete": {
                    "summary": "Revoke an API key",
                    "parameters": [
                        {
                            "name": "prefix",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": answer("revoked"), **errors},
                }
            },
        },  # fmt: skip
    }
