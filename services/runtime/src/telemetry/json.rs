//! A `tracing` layer that writes one JSON object a line.
//!
//! Each line has `timestamp` (RFC 3339, UTC), `level`, `target`, `message`,
//! the fields of every enclosing span (root first, inner spans override), the
//! event's own fields, and `trace_id`/`span_id` of the OpenTelemetry span the
//! event belongs to. Pinned field names (docs/architecture.md): `session_id`, `provider`,
//! `model`, `latency_ms`, `tokens_used` are ordinary span or event fields.
//! Fields named `otel.*` only steer the OpenTelemetry layer and are left out.

use std::{io::Write, sync::OnceLock};

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::{
    Dispatch, Event, Subscriber,
    dispatcher::WeakDispatch,
    field::{Field, Visit},
    span::{Attributes, Id, Record},
};
use tracing_subscriber::{Layer, fmt::MakeWriter, layer::Context, registry::LookupSpan};

/// The JSON log layer; `W` makes the writer of each line (stdout in services).
pub struct JsonLogLayer<W> {
    make_writer: W,
    /// The subscriber this layer is part of, kept from registration:
    /// `dispatcher::get_default` answers the no-op dispatcher while an event
    /// is being dispatched (tracing's re-entrancy guard), so it cannot be used
    /// in `on_event` to read the OpenTelemetry context.
    dispatch: OnceLock<WeakDispatch>,
}

impl<W> JsonLogLayer<W> {
    /// A layer writing to `make_writer`.
    pub fn new(make_writer: W) -> Self {
        Self {
            make_writer,
            dispatch: OnceLock::new(),
        }
    }
}

/// The fields recorded on a span, kept in its extensions.
struct SpanFields(Map<String, Value>);

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        if !field.name().starts_with("otel.") {
            self.0.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

impl<S, W> Layer<S> for JsonLogLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = self.dispatch.set(subscriber.downgrade());
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut fields = Map::new();
            attrs.record(&mut JsonVisitor(&mut fields));
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
                values.record(&mut JsonVisitor(fields));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut line = Map::new();
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        line.insert("timestamp".into(), Value::from(timestamp));
        line.insert(
            "level".into(),
            Value::from(meta.level().as_str().to_ascii_lowercase()),
        );
        line.insert("target".into(), Value::from(meta.target()));
        if let Some(scope) = ctx.event_scope(event) {
            let spans: Vec<_> = scope.from_root().collect();
            for span in &spans {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    line.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            // The innermost span's OpenTelemetry context names the trace. No
            // extensions are borrowed here, as `get_otel_context` requires.
            if let Some(leaf) = spans.last() {
                let cx = self
                    .dispatch
                    .get()
                    .and_then(WeakDispatch::upgrade)
                    .and_then(|dispatch| {
                        tracing_opentelemetry::get_otel_context(&leaf.id(), &dispatch)
                    });
                if let Some(cx) = cx {
                    let span = cx.span();
                    let sc = span.span_context();
                    if sc.is_valid() {
                        line.insert("trace_id".into(), Value::from(sc.trace_id().to_string()));
                        line.insert("span_id".into(), Value::from(sc.span_id().to_string()));
                    }
                }
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        let mut buf = match serde_json::to_vec(&line) {
            Ok(buf) => buf,
            Err(_) => return,
        };
        buf.push(b'\n');
        // One write per line so concurrent lines never interleave.
        let _ = self.make_writer.make_writer().write_all(&buf);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn lines_carry_span_fields_and_trace_ids() {
        use opentelemetry::trace::TracerProvider as _;
        let buffer = Buffer::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")))
            .with(JsonLogLayer::new(buffer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("turn", session_id = "s-1", otel.kind = "server");
            let _g = span.enter();
            tracing::info!(latency_ms = 12u64, model = "qwen", "generated");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["message"], "generated");
        assert_eq!(v["level"], "info");
        assert_eq!(v["session_id"], "s-1");
        assert_eq!(v["latency_ms"], 12);
        assert_eq!(v["model"], "qwen");
        assert!(v.get("otel.kind").is_none());
        assert_eq!(v["trace_id"].as_str().unwrap().len(), 32);
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
