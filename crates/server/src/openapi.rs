//! The OpenAPI 3.1 description of `/api/v1`, served at `/api/v1/openapi.json`.

use serde_json::{Value, json};

fn filter_params() -> Value {
    json!([
        {"name": "queue", "in": "query", "schema": {"type": "string"}, "description": "Only this queue"},
        {"name": "fingerprint", "in": "query", "schema": {"type": "string"}, "description": "Only this error fingerprint"},
        {"name": "class", "in": "query", "schema": {"type": "string"}, "description": "Only this error class"},
        {"name": "since_ms", "in": "query", "schema": {"type": "integer"}, "description": "Dead at or after (unix ms)"},
        {"name": "until_ms", "in": "query", "schema": {"type": "integer"}, "description": "Dead before (unix ms)"},
        {"name": "q", "in": "query", "schema": {"type": "string"}, "description": "Text contained in the error or the payload"}
    ])
}

fn ok(schema: Value, description: &str) -> Value {
    json!({
        "200": {"description": description, "content": {"application/json": {"schema": schema}}},
        "400": {"$ref": "#/components/responses/Error"},
        "401": {"$ref": "#/components/responses/Error"},
        "403": {"$ref": "#/components/responses/Error"}
    })
}

/// The document.
#[must_use]
pub fn document() -> Value {
    let mut list_params = filter_params();
    if let Some(a) = list_params.as_array_mut() {
        a.push(json!({"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "next_cursor of the previous page"}));
        a.push(json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}}));
    }
    let mut group_params = filter_params();
    if let Some(a) = group_params.as_array_mut() {
        a.push(json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 200}}));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "redrive triage API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Dead-letter triage: lanes, dead messages grouped by fingerprint, replay, purge, export, audit. Writes need the operator role."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/queues": {"get": {"summary": "Queues with lane depths and oldest ages", "responses": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Queue"}}), "Queues")}},
            "/api/v1/dead": {"get": {"summary": "Dead messages, filtered, oldest first, cursor-paginated", "parameters": list_params,
                "responses": ok(json!({"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/DeadMessage"}}, "next_cursor": {"type": ["string", "null"]}}}), "A page")}},
            "/api/v1/dead/{id}": {"get": {"summary": "One dead message: payload, headers, attempt history",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                "responses": ok(json!({"$ref": "#/components/schemas/DeadMessage"}), "The message")}},
            "/api/v1/dead/{id}/replay": {"post": {"summary": "Replay one message, optionally with an edited payload",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "properties": {
                    "payload": {"type": "string", "description": "Replacement payload (UTF-8)"},
                    "to": {"type": "string", "description": "Target queue (default: the message's own)"},
                    "dry_run": {"type": "boolean"}, "reason": {"type": "string"}}}}}},
                "responses": ok(json!({"$ref": "#/components/schemas/ReplayReport"}), "What moved")}},
            "/api/v1/groups": {"get": {"summary": "Dead messages grouped by error fingerprint, largest first", "parameters": group_params,
                "responses": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Group"}}), "Groups")}},
            "/api/v1/replay": {"post": {"summary": "Replay a selection (ids, a filter, or all), with dry-run, target queue and rate limit",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Bulk"}}}},
                "responses": ok(json!({"$ref": "#/components/schemas/ReplayReport"}), "What moved (or would move)")}},
            "/api/v1/purge": {"post": {"summary": "Delete a selection for good",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Bulk"}}}},
                "responses": ok(json!({"type": "object", "properties": {"dry_run": {"type": "boolean"}, "purged": {"type": "integer"}}}), "How many")}},
            "/api/v1/export": {"get": {"summary": "Stream matching dead messages as JSON lines", "parameters": filter_params(),
                "responses": {"200": {"description": "One DeadMessage per line", "content": {"application/x-ndjson": {}}}}}},
            "/api/v1/audit": {"get": {"summary": "The audit log: who replayed, edited or purged what, when and why",
                "responses": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}}), "Newest first")}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "REDRIVE_TOKEN (operator) or REDRIVE_VIEWER_TOKEN (read-only)"}},
            "responses": {"Error": {"description": "What went wrong", "content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}}},
            "schemas": {
                "Queue": {"type": "object", "properties": {
                    "queue": {"type": "string"}, "main": {"type": "integer"}, "retry": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "isolated": {"type": "integer", "description": "Crash suspects waiting to be run alone"},
                    "dlq": {"type": "integer"}, "inflight": {"type": "integer"}, "oldest_main_age_ms": {"type": ["integer", "null"]},
                    "oldest_dead_age_ms": {"type": ["integer", "null"]}}},
                "Failure": {"type": "object", "properties": {
                    "attempt": {"type": "integer"}, "at": {"type": "string", "format": "date-time"}, "lane": {"type": "string"},
                    "kind": {"type": "string", "enum": ["retry", "poison", "timeout", "panic", "lease_expired"]},
                    "error_class": {"type": "string"}, "error": {"type": "string"}, "fingerprint": {"type": "string"},
                    "counted": {"type": "boolean", "description": "Whether it counts towards max attempts: a crash that may have been another message's does not"}}},
                "DeadMessage": {"type": "object", "properties": {
                    "id": {"type": "string", "format": "uuid"}, "queue": {"type": "string"}, "attempts": {"type": "integer"}, "replays": {"type": "integer"},
                    "error_class": {"type": "string"}, "error": {"type": "string"}, "fingerprint": {"type": "string"}, "key": {"type": ["string", "null"]},
                    "payload": {"type": "string"}, "payload_encoding": {"type": "string", "enum": ["utf8", "base64"]},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "first_failed_at": {"type": ["string", "null"], "format": "date-time"}, "last_failed_at": {"type": ["string", "null"], "format": "date-time"},
                    "dead_at": {"type": "string", "format": "date-time"}, "history": {"type": "array", "items": {"$ref": "#/components/schemas/Failure"}}}},
                "Group": {"type": "object", "properties": {
                    "fingerprint": {"type": "string"}, "error_class": {"type": "string"}, "count": {"type": "integer"},
                    "first_seen": {"type": "string", "format": "date-time"}, "last_seen": {"type": "string", "format": "date-time"},
                    "sample_error": {"type": "string"}, "queues": {"type": "array", "items": {"type": "string"}}}},
                "Bulk": {"type": "object", "description": "Exactly one of ids, filter or all.", "properties": {
                    "ids": {"type": "array", "items": {"type": "string", "format": "uuid"}},
                    "filter": {"type": "object", "properties": {"queue": {"type": "string"}, "fingerprint": {"type": "string"}, "class": {"type": "string"},
                        "since_ms": {"type": "integer"}, "until_ms": {"type": "integer"}, "q": {"type": "string"}}},
                    "all": {"type": "boolean"}, "to": {"type": "string"}, "dry_run": {"type": "boolean"},
                    "rate_per_sec": {"type": "integer", "minimum": 1}, "max_replays": {"type": "integer"}, "reason": {"type": "string"}}},
                "ReplayReport": {"type": "object", "properties": {
                    "dry_run": {"type": "boolean"}, "matched": {"type": "integer"}, "replayed": {"type": "integer"},
                    "over_replay_limit": {"type": "array", "items": {"type": "string"}},
                    "by_queue": {"type": "object", "additionalProperties": {"type": "integer"}}}},
                "AuditEntry": {"type": "object", "properties": {
                    "at": {"type": "string", "format": "date-time"}, "actor": {"type": "string"}, "action": {"type": "string"},
                    "detail": {"type": "string"}, "count": {"type": "integer"}, "reason": {"type": "string"}}}
            }
        }
    })
}
