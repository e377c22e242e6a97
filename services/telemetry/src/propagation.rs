//! Carrying a trace across the gateway → node hop: the W3C trace context of a task's span
//! travels in the assignment as a small string map (`traceparent`, `tracestate`).

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The W3C headers for `span`'s context; empty for an invalid (no-op) span.
pub fn inject(span: &SpanContext) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    if span.is_valid() {
        let context = Context::new().with_remote_span_context(span.clone());
        TraceContextPropagator::new().inject_context(&context, &mut carrier);
    }
    carrier
}

/// The parent context the headers name (an empty context when there are none).
pub fn extract(carrier: &HashMap<String, String>) -> Context {
    TraceContextPropagator::new().extract(carrier)
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn a_span_context_survives_the_round_trip() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let carrier = inject(&span);
        assert_eq!(
            carrier["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let parent = extract(&carrier);
        assert_eq!(parent.span().span_context().trace_id(), span.trace_id());
        assert!(parent.span().span_context().is_remote());
        assert!(inject(&SpanContext::empty_context()).is_empty());
        assert!(!extract(&HashMap::new()).span().span_context().is_valid());
    }
}
