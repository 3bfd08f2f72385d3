//! The OpenAPI 3.1 description of `/api/v1`, served at `/api/v1/openapi.json`.
//!
//! Every answer an operation can give is listed, with the API's JSON error shape for
//! every 4xx, and every input the handlers refuse is outside its schema (a queue name's
//! pattern, a page's limits, a bulk selection's "exactly one of"), so a client built from
//! this document, or a fuzzer reading it, meets no surprise.

use serde_json::{Value, json};

/// A queue name: dot-separated segments of letters, digits, `_` and `-`, starting with
/// a letter or digit, at most 64 characters. (Names ending in a lane suffix, `.dlq`,
/// `.isolated` or `.retry.<tier>`, are refused too; a pattern without look-ahead cannot
/// say so.)
fn queue_name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 64,
        "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]*(\\.[A-Za-z0-9_-]+)*$",
        "description": "A queue name, e.g. agent.tasks"})
}

/// Unix milliseconds redrive can store and show (1970 to 9999).
fn unix_ms() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": redrive_core::MAX_TIME_MS})
}

/// A replay's target queue; empty or null (as absent) means each message's own.
fn target() -> Value {
    json!({"anyOf": [queue_name(), {"const": ""}, {"type": "null"}],
        "description": "Target queue (empty or absent: each message's own)"})
}

fn text() -> Value {
    json!({"type": "string", "minLength": 1})
}

/// A filter's queue as a query parameter: a queue name, or empty for any (HTML forms
/// send empty fields).
fn queue_param() -> Value {
    json!({"type": "string", "maxLength": 64,
        "pattern": "^([A-Za-z0-9][A-Za-z0-9_-]*(\\.[A-Za-z0-9_-]+)*)?$"})
}

/// The filters of listing, grouping and export, as query parameters.
fn filter_params() -> Value {
    json!([
        {"name": "queue", "in": "query", "schema": queue_param(), "description": "Only this queue (empty: any)"},
        {"name": "fingerprint", "in": "query", "schema": {"type": "string"}, "description": "Only this error fingerprint"},
        {"name": "class", "in": "query", "schema": {"type": "string"}, "description": "Only this error class"},
        {"name": "since_ms", "in": "query", "schema": unix_ms(), "description": "Dead at or after (unix ms)"},
        {"name": "until_ms", "in": "query", "schema": unix_ms(), "description": "Dead before (unix ms)"},
        {"name": "q", "in": "query", "schema": {"type": "string"}, "description": "Text contained in the error or the payload"}
    ])
}

/// A bulk selection's filter: at least one criterion (an empty filter would select
/// everything: `"all": true` says that).
fn filter_object() -> Value {
    json!({"type": "object", "minProperties": 1, "additionalProperties": false, "properties": {
        "queue": queue_name(), "fingerprint": text(), "class": text(),
        "since_ms": unix_ms(), "until_ms": unix_ms(), "q": text()}})
}

fn error() -> Value {
    json!({"$ref": "#/components/responses/Error"})
}

/// The answers of every operation: `200` with `schema`, and the errors any request can
/// meet (a bad parameter, no token, a read-only token).
fn ok(schema: Value, description: &str) -> Value {
    json!({
        "200": {"description": description, "content": {"application/json": {"schema": schema}}},
        "400": error(),
        "401": error(),
        "403": error()
    })
}

/// [`ok`], for an operation on one message, which may not exist.
fn ok_or_missing(schema: Value, description: &str) -> Value {
    let mut responses = ok(schema, description);
    responses["404"] = error();
    responses
}

/// [`ok`], for an operation with a JSON body: one over the size limit is a 413, one not
/// declared as JSON a 415, JSON of the wrong shape a 422.
fn ok_with_body(mut responses: Value) -> Value {
    responses["413"] = error();
    responses["415"] = error();
    responses["422"] = error();
    responses
}

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}})
}

/// A job id: `rj-` and 32 hexadecimal digits.
fn job_id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^rj-[0-9a-fA-F]{32}$"}})
}

/// The answers of an action on a job: the job after it, or a 409 when its state does
/// not allow the action (a done job cannot be paused).
fn job_acted() -> Value {
    let mut responses = ok_or_missing(
        json!({"$ref": "#/components/schemas/Job"}),
        "The job after the action",
    );
    responses["409"] = error();
    responses
}

/// The answers of starting a job: 202 with the job, which runs on in the server.
fn job_started() -> Value {
    json!({
        "202": {"description": "Started; it runs in the server (follow it with getJob)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}},
            "links": {
                "GetJob": {"operationId": "getJob", "parameters": {"id": "$response.body#/id"}},
                "PauseJob": {"operationId": "pauseJob", "parameters": {"id": "$response.body#/id"}},
                "ResumeJob": {"operationId": "resumeJob", "parameters": {"id": "$response.body#/id"}},
                "CancelJob": {"operationId": "cancelJob", "parameters": {"id": "$response.body#/id"}}
            }},
        "400": error(), "401": error(), "403": error()
    })
}

fn job_schema() -> Value {
    let count = json!({"type": "integer", "minimum": 0});
    json!({"type": "object", "required": ["id", "state", "counts"], "properties": {
        "id": {"type": "string"}, "state": {"type": "string", "enum": ["running", "paused", "done", "cancelled"]},
        "note": {"type": "string", "description": "Why it is paused, or how it ended"},
        "created_at": {"type": "string", "format": "date-time"}, "updated_at": {"type": "string", "format": "date-time"},
        "actor": {"type": "string"}, "reason": {"type": "string"}, "selection": {"type": "string"},
        "to": {"type": ["string", "null"]}, "canary": {"type": "integer"}, "canary_passed": {"type": "boolean"},
        "max_failed_percent": {"type": "number"}, "ordered": {"type": "boolean"},
        "edited": {"type": "boolean", "description": "One message, replayed with its payload edited"},
        "runner": {"type": ["string", "null"], "description": "The process running it now"},
        "counts": {"type": "object", "properties": {
            "total": count, "pending": count, "moved": count, "ok": count, "failed": count, "held": count, "skipped": count}}}})
}

/// A new job: a selection as for a replay (exactly one of ids, filter or "all": true),
/// and canaries (a count or a percentage, not both) or "ordered": true, or both.
fn new_job() -> Value {
    let all = json!({"required": ["all"], "properties": {"all": {"const": true}}});
    json!({"type": "object", "additionalProperties": false,
    "properties": {
        "ids": {"type": "array", "minItems": 1, "maxItems": 10000, "items": {"type": "string", "format": "uuid"}},
        "filter": filter_object(),
        "all": {"type": "boolean"}, "to": target(),
        "max_replays": {"type": ["integer", "null"], "minimum": 0, "maximum": u32::MAX},
        "reason": {"type": "string"},
        "canary": {"type": ["integer", "null"], "minimum": 1, "maximum": 1_000_000_000_u64, "description": "Messages sent first, alone"},
        "canary_percent": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 100, "description": "Or this percentage of the selection"},
        "max_failed_percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100, "description": "Re-failures tolerated (default 0)"},
        "ordered": {"type": "boolean", "description": "Each key's messages one at a time, in their original order"}},
    "allOf": [
        {"oneOf": [
            {"required": ["ids"], "not": {"anyOf": [{"required": ["filter"]}, all.clone()]}},
            {"required": ["filter"], "not": {"anyOf": [{"required": ["ids"]}, all.clone()]}},
            {"allOf": [all.clone()], "not": {"anyOf": [{"required": ["ids"]}, {"required": ["filter"]}]}}
        ]},
        {"anyOf": [
            {"required": ["canary"], "properties": {"canary": {"type": "integer"}}},
            {"required": ["canary_percent"], "properties": {"canary_percent": {"type": "number"}}},
            {"required": ["ordered"], "properties": {"ordered": {"const": true}}}
        ]},
        {"not": {"required": ["canary", "canary_percent"], "properties": {"canary": {"type": "integer"}, "canary_percent": {"type": "number"}}}}
    ]})
}

/// The document.
#[must_use]
pub fn document() -> Value {
    let mut list_params = filter_params();
    if let Some(a) = list_params.as_array_mut() {
        a.push(json!({"name": "cursor", "in": "query", "description": "next_cursor of the previous page",
            "schema": {"type": "string", "pattern": "^([0-9]{1,15}\\.[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$"}}));
        a.push(json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}}));
    }
    let mut group_params = filter_params();
    if let Some(a) = group_params.as_array_mut() {
        a.push(json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 200}}));
    }
    // The first message of a page leads to its own operations (a client, or a fuzzer,
    // finds real ids this way).
    let mut dead_page = ok(
        json!({"type": "object", "required": ["items", "next_cursor"], "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/DeadMessage"}}, "next_cursor": {"type": ["string", "null"]}}}),
        "A page",
    );
    dead_page["200"]["links"] = json!({
        "GetFirst": {"operationId": "getDead", "parameters": {"id": "$response.body#/items/0/id"}},
        "ReplayFirst": {"operationId": "replayDead", "parameters": {"id": "$response.body#/items/0/id"}}
    });
    let export_responses = json!({
        "200": {"description": "One DeadMessage per line", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
        "400": error(), "401": error(), "403": error()
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "redrive triage API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Dead-letter triage: lanes, dead messages grouped by fingerprint, replay, purge, export, audit. Writes need the operator role. Every error is {\"error\": \"...\"}; a path not listed here answers 404."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/queues": {"get": {"summary": "Queues with lane depths and oldest ages", "responses": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Queue"}}), "Queues")}},
            "/api/v1/dead": {"get": {"operationId": "listDead", "summary": "Dead messages, filtered, oldest first, cursor-paginated", "parameters": list_params,
                "responses": dead_page}},
            "/api/v1/dead/{id}": {"get": {"operationId": "getDead", "summary": "One dead message: payload, headers, attempt history",
                "parameters": [id_param()],
                "responses": ok_or_missing(json!({"$ref": "#/components/schemas/DeadMessage"}), "The message")}},
            "/api/v1/dead/{id}/replay": {"post": {"operationId": "replayDead", "summary": "Replay one message, optionally with an edited payload",
                "parameters": [id_param()],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {
                    "payload": {"type": ["string", "null"], "description": "Replacement payload (UTF-8)"},
                    "to": target(),
                    "dry_run": {"type": "boolean"}, "reason": {"type": "string"}}}}}},
                "responses": ok_with_body(ok_or_missing(json!({"$ref": "#/components/schemas/ReplayReport"}), "What moved"))}},
            "/api/v1/groups": {"get": {"summary": "Dead messages grouped by error fingerprint, largest first", "parameters": group_params,
                "responses": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Group"}}), "Groups")}},
            "/api/v1/replay": {"post": {"summary": "Replay a selection (ids, a filter, or all), with dry-run, target queue and rate limit",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Bulk"}}}},
                "responses": ok_with_body(ok(json!({"$ref": "#/components/schemas/ReplayReport"}), "What moved (or would move)"))}},
            "/api/v1/purge": {"post": {"summary": "Delete a selection for good",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Bulk"}}}},
                "responses": ok_with_body(ok(json!({"type": "object", "required": ["dry_run", "purged"], "properties": {"dry_run": {"type": "boolean"}, "purged": {"type": "integer"}}}), "How many"))}},
            "/api/v1/export": {"get": {"summary": "Stream matching dead messages as JSON lines", "parameters": filter_params(),
                "responses": export_responses}},
            "/api/v1/audit": {"get": {"summary": "The audit log: who replayed, edited or purged what, when and why",
                "responses": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}}), "Newest first")}},
            "/api/v1/jobs": {
                "get": {"operationId": "listJobs", "summary": "Replay jobs, newest first",
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}}],
                    "responses": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/Job"}}), "Jobs")},
                "post": {"operationId": "startJob", "summary": "Start a replay job (canaries first, or each key in order); it runs in the server",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewJob"}}}},
                    "responses": ok_with_body(job_started())}},
            "/api/v1/jobs/{id}": {"get": {"operationId": "getJob", "summary": "One job, with its canaries and the messages that failed again, were held or skipped",
                "parameters": [job_id_param()],
                "responses": ok_or_missing(json!({"$ref": "#/components/schemas/JobDetail"}), "The job")}},
            "/api/v1/jobs/{id}/pause": {"post": {"operationId": "pauseJob", "summary": "Pause a running job after its current step",
                "parameters": [job_id_param()], "responses": job_acted()}},
            "/api/v1/jobs/{id}/resume": {"post": {"operationId": "resumeJob", "summary": "Go on with a paused job (past its failed canaries and the re-failures so far)",
                "parameters": [job_id_param()], "responses": job_acted()}},
            "/api/v1/jobs/{id}/cancel": {"post": {"operationId": "cancelJob", "summary": "Stop a job for good; what it did not move stays dead",
                "parameters": [job_id_param()], "responses": job_acted()}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "REDRIVE_TOKEN (operator) or REDRIVE_VIEWER_TOKEN (read-only)"}},
            "responses": {"Error": {"description": "What went wrong", "content": {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}},
            "schemas": {
                "Queue": {"type": "object", "properties": {
                    "queue": {"type": "string"}, "main": {"type": "integer"}, "retry": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "isolated": {"type": "integer", "description": "Crash suspects waiting to be run alone"},
                    "dlq": {"type": "integer"}, "inflight": {"type": "integer"}, "oldest_main_age_ms": {"type": ["integer", "null"]},
                    "oldest_dead_age_ms": {"type": ["integer", "null"]},
                    "breakers_open": {"type": "integer", "description": "Consumers whose outage breaker on the queue is open now"}}},
                "Failure": {"type": "object", "properties": {
                    "attempt": {"type": "integer"}, "at": {"type": "string", "format": "date-time"}, "lane": {"type": "string"},
                    "kind": {"type": "string", "enum": ["retry", "poison", "timeout", "panic", "lease_expired"]},
                    "error_class": {"type": "string"}, "error": {"type": "string"}, "fingerprint": {"type": "string"},
                    "counted": {"type": "boolean", "description": "Whether it counts towards max attempts: a crash that may have been another message's does not"},
                    "model": {"type": "string", "description": "The model the attempt called, when its handler said"},
                    "tool": {"type": "string", "description": "The tool it was running, when its handler said"},
                    "cost": {"$ref": "#/components/schemas/Cost"}}},
                "Cost": {"type": "object", "description": "Tokens and US dollars, as handlers reported them", "properties": {
                    "input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"}, "usd": {"type": "number"}}},
                "DeadMessage": {"type": "object", "properties": {
                    "id": {"type": "string", "format": "uuid"}, "queue": {"type": "string"}, "attempts": {"type": "integer"}, "replays": {"type": "integer"},
                    "error_class": {"type": "string"}, "error": {"type": "string"}, "fingerprint": {"type": "string"}, "key": {"type": ["string", "null"]},
                    "payload": {"type": "string"}, "payload_encoding": {"type": "string", "enum": ["utf8", "base64"]},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "first_failed_at": {"type": ["string", "null"], "format": "date-time"}, "last_failed_at": {"type": ["string", "null"], "format": "date-time"},
                    "dead_at": {"type": "string", "format": "date-time"},
                    "cost": {"$ref": "#/components/schemas/Cost", "description": "What its failed attempts cost, summed"}, "history": {"type": "array", "items": {"$ref": "#/components/schemas/Failure"}},
                    "replay_jobs": {"type": "array", "description": "(One message only) the replay jobs it went through, oldest first", "items": {"$ref": "#/components/schemas/Lineage"}}}},
                "Group": {"type": "object", "properties": {
                    "fingerprint": {"type": "string"}, "error_class": {"type": "string"}, "count": {"type": "integer"},
                    "first_seen": {"type": "string", "format": "date-time"}, "last_seen": {"type": "string", "format": "date-time"},
                    "sample_error": {"type": "string"}, "queues": {"type": "array", "items": {"type": "string"}},
                    "attempts": {"type": "integer", "description": "Failed attempts of its messages, summed"},
                    "cost": {"$ref": "#/components/schemas/Cost", "description": "What those failed attempts cost, summed"}}},
                "Bulk": {"type": "object", "description": "A selection, by exactly one of ids, filter or \"all\": true.",
                    "additionalProperties": false,
                    "properties": {
                        "ids": {"type": "array", "minItems": 1, "maxItems": 10000, "items": {"type": "string", "format": "uuid"}},
                        "filter": filter_object(),
                        "all": {"type": "boolean"}, "to": target(), "dry_run": {"type": "boolean"},
                        "rate_per_sec": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000},
                        "max_replays": {"type": ["integer", "null"], "minimum": 0, "maximum": u32::MAX},
                        "reason": {"type": "string"}},
                    "oneOf": [
                        {"required": ["ids"], "not": {"anyOf": [{"required": ["filter"]}, {"required": ["all"], "properties": {"all": {"const": true}}}]}},
                        {"required": ["filter"], "not": {"anyOf": [{"required": ["ids"]}, {"required": ["all"], "properties": {"all": {"const": true}}}]}},
                        {"required": ["all"], "properties": {"all": {"const": true}}, "not": {"anyOf": [{"required": ["ids"]}, {"required": ["filter"]}]}}
                    ]},
                "ReplayReport": {"type": "object", "required": ["dry_run", "matched", "replayed", "over_replay_limit", "by_queue"], "properties": {
                    "dry_run": {"type": "boolean"}, "matched": {"type": "integer"}, "replayed": {"type": "integer"},
                    "over_replay_limit": {"type": "array", "items": {"type": "string"}},
                    "by_queue": {"type": "object", "additionalProperties": {"type": "integer"}}}},
                "NewJob": new_job(),
                "Job": job_schema(),
                "JobDetail": {"allOf": [{"$ref": "#/components/schemas/Job"}, {"type": "object", "required": ["messages"], "properties": {
                    "messages": {"type": "array", "items": {"type": "object", "properties": {
                        "id": {"type": "string", "format": "uuid"}, "key": {"type": ["string", "null"]}, "canary": {"type": "boolean"},
                        "state": {"type": "string", "enum": ["pending", "moved", "ok", "failed", "held", "skipped"]},
                        "detail": {"type": "string", "description": "The new error, or why it was held or skipped"},
                        "was": {"type": "string", "description": "The error it died of before the job"},
                        "at": {"type": "string", "format": "date-time"}}}}}}]},
                "Lineage": {"type": "object", "properties": {
                    "job": {"type": "string"}, "actor": {"type": "string"}, "reason": {"type": "string"},
                    "started_at": {"type": "string", "format": "date-time"},
                    "outcome": {"type": "string", "enum": ["pending", "moved", "ok", "failed", "held", "skipped"]},
                    "detail": {"type": "string"}, "at": {"type": "string", "format": "date-time"},
                    "edited": {"type": "boolean", "description": "Its payload was edited for this replay"}}},
                "AuditEntry": {"type": "object", "properties": {
                    "at": {"type": "string", "format": "date-time"}, "actor": {"type": "string"}, "action": {"type": "string"},
                    "detail": {"type": "string"}, "count": {"type": "integer"}, "reason": {"type": "string"}}}
            }
        }
    })
}
