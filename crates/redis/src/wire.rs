//! An envelope as a Redis stream entry and back: the fields redrive writes, and the
//! replies it reads them from.

use redis::Value;
use redrive_core::{Envelope, MessageId, QueueName, now_ms};

/// A parsed stream entry.
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
    pub(crate) fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

pub(crate) fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// `[[id, [f, v, …]], …]` → entries.
pub(crate) fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = String::from_utf8(bytes(pair.first()?)?).ok()?;
            let fields = match pair.get(1)? {
                Value::Array(kv) => kv
                    .chunks(2)
                    .filter_map(|c| {
                        Some((
                            String::from_utf8(bytes(c.first()?)?).ok()?,
                            bytes(c.get(1)?)?,
                        ))
                    })
                    .collect(),
                _ => Vec::new(), // A deleted entry still listed as pending.
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// `XREADGROUP` reply: `[[stream, entries]]` or nil.
pub(crate) fn read_reply(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| {
                if let Value::Array(pair) = s {
                    pair.get(1).map(entries)
                } else {
                    None
                }
            })
            .flatten()
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => Vec::new(),
    }
}

/// Reads an envelope from an entry of stream `key`. A plain `XADD` (no redrive headers)
/// gets an id derived from the entry's own id (or, once released and added again, the
/// `origin` it first had), so every delivery of it has the same id.
///
/// An entry that cannot be read (no `payload` field, an `h` field that is not redrive's
/// JSON, a redrive header that does not parse) gives what could be read of it as a dead
/// letter to quarantine, with why ([`Envelope::unreadable`]).
pub(crate) fn envelope_of(
    queue: &QueueName,
    key: &str,
    e: &Entry,
) -> Result<Envelope, Box<Envelope>> {
    let unreadable = |headers: Vec<(String, String)>, reason: String| {
        let why = format!("entry {} of {key}: {reason}", e.id);
        let lane = e.text("lane").unwrap_or_else(|| "main".to_owned());
        Box::new(Envelope::unreadable(
            queue.clone(),
            entry_id(key, e),
            e.get("payload").unwrap_or_default().to_vec(),
            headers,
            &why,
            &lane,
            now_ms(),
        ))
    };
    let Some(payload) = e.get("payload") else {
        return Err(unreadable(Vec::new(), "it has no payload field".to_owned()));
    };
    let headers: Vec<(String, String)> = match e.get("h") {
        Some(h) => serde_json::from_slice(h).map_err(|err| {
            unreadable(
                Vec::new(),
                format!("its h field is not a JSON list of header pairs: {err}"),
            )
        })?,
        None => Vec::new(),
    };
    Envelope::from_wire_at(
        queue,
        e.text("key"),
        payload.to_vec(),
        headers.clone(),
        || entry_id(key, e),
    )
    .map_err(|err| unreadable(headers, err.to_string()))
}

/// The id of an entry that carries none: derived from the stream and the entry id it
/// was first added with (`<ms>-<seq>`).
fn entry_id(key: &str, e: &Entry) -> MessageId {
    let first = e.text("origin").unwrap_or_else(|| e.id.clone());
    let (ms, seq) = first.split_once('-').unwrap_or((&first, "0"));
    MessageId::at(key, ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

pub(crate) fn wire(env: &Envelope) -> String {
    env.to_wire_json()
}
