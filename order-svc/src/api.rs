//! The `orders.v1.OrderService` gRPC handler: validate, dedupe, publish, answer.

use std::sync::Arc;

use orders_contract::{
    envelope,
    v1::{CreateOrderRequest, CreateOrderResponse, Order, OrderCreated, order_service_server::OrderService},
};
use service_kit::telemetry::{self, TraceContext};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{Instrument, field::Empty};

use crate::{
    auth::{Authenticator, Principal},
    domain::NewOrder,
    error::Error,
    idempotency::{self, Answers, Seen},
    metrics::Metrics,
    publisher::Publisher,
};

/// Serves `CreateOrder`.
#[derive(Debug)]
pub struct OrderApi {
    publisher: Arc<Publisher>,
    answers: Answers,
    metrics: Arc<Metrics>,
    ce_source: String,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    auth: Option<Arc<Authenticator>>,
}

impl OrderApi {
    /// A handler publishing through `publisher`, answering at most
    /// `max_in_flight` calls at once (more are shed with RESOURCE_EXHAUSTED).
    pub fn new(
        publisher: Arc<Publisher>,
        answers: Answers,
        metrics: Arc<Metrics>,
        ce_source: String,
        max_in_flight: usize,
    ) -> Self {
        Self {
            publisher,
            answers,
            metrics,
            ce_source,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            auth: None,
        }
    }

    /// Requires a bearer token checked by `auth` on every call.
    pub fn with_auth(mut self, auth: Option<Authenticator>) -> Self {
        self.auth = auth.map(Arc::new);
        self
    }

    /// Creates an order and publishes its event; the order is returned only
    /// once the broker has acknowledged the event. `caller` is the
    /// authenticated principal when authentication is on; `call` carries the
    /// call's trace and collects what its log lines show.
    async fn create(
        &self,
        request: CreateOrderRequest,
        caller: Option<Principal>,
        call: &mut Call,
    ) -> Result<Order, Error> {
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| Error::Overloaded(self.max_in_flight))?;
        let new = NewOrder::try_from(request).map_err(Error::InvalidOrder)?;
        call.record(Field::User, &new.user_id);
        if let Some(caller) = &caller {
            caller.authorize(&new.user_id)?;
        }
        let reservation = match self.answers.reserve(&new).await {
            Seen::New(reservation) => reservation,
            Seen::Replay(order) => {
                call.record(Field::Order, &order.order_id);
                tracing::debug!(order_id = %order.order_id, "idempotent replay");
                return Ok(order);
            }
            Seen::Conflict => {
                return Err(Error::IdempotencyConflict(new.request_id.unwrap_or_default()));
            }
        };

        let ids = idempotency::ids_for(&new);
        let now = orders_contract::timestamp(time::OffsetDateTime::now_utc());
        let order = Order {
            order_id: ids.order_id.to_string(),
            user_id: new.user_id.clone(),
            items: new.items.iter().map(Into::into).collect(),
            currency: new.currency.clone(),
            total_minor: new.total_minor,
            created_at: Some(now),
            request_id: new.request_id.clone().unwrap_or_default(),
        };
        call.record(Field::Order, &order.order_id);
        let event = OrderCreated {
            event_id: ids.event_id.to_string(),
            order: Some(order),
            occurred_at: Some(now),
        };
        call.record(Field::Event, &event.event_id);
        let record = envelope::encode_order_created(&event, &self.ce_source);
        self.publisher.publish(&record, &call.trace_headers()).await?;

        self.metrics.orders_created.inc();
        let order = event.order.unwrap_or_default();
        reservation.answer(&order);
        tracing::debug!(order_id = %order.order_id, total_minor = order.total_minor, currency = %order.currency, "order created");
        Ok(order)
    }

    /// Authenticates, creates, logs a refused or failed call.
    async fn handle(&self, request: Request<CreateOrderRequest>, call: &mut Call) -> Result<Order, Status> {
        let caller = match &self.auth {
            Some(auth) => match auth.authenticate(request.metadata()) {
                Ok(principal) => Some(principal),
                Err(error) => {
                    call.log_span().in_scope(|| tracing::info!(%error, "call refused"));
                    return Err(error.into());
                }
            },
            None => None,
        };
        self.create(request.into_inner(), caller, call).await.map_err(|error| {
            call.log_span().in_scope(|| match &error {
                Error::InvalidOrder(_) | Error::IdempotencyConflict(_) => tracing::info!(%error, "order refused"),
                _ => tracing::warn!(%error, "order failed"),
            });
            error.into()
        })
    }
}

/// The fields a `CreateOrder` span carries.
#[derive(Debug, Clone, Copy)]
enum Field {
    /// `user_id`
    User,
    /// `order_id`
    Order,
    /// `event_id`
    Event,
}

/// How one `CreateOrder` call is traced and logged.
///
/// When spans are exported ([`telemetry::exporting`]) the call has its own
/// `CreateOrder` span, as every other unit of work. Otherwise it carries only
/// a W3C [`TraceContext`] (continued from the caller's `traceparent`) for the
/// event's headers, and keeps its fields for the log line of a refused or
/// failed call, which gets a `CreateOrder` span made for it with those fields
/// and the trace id. A span per call cost about 10% of order-svc's CPU per
/// call (BENCHMARKS.md), for nothing when the call succeeds.
#[derive(Debug)]
enum Call {
    /// The call's own span (spans are exported).
    Span(tracing::Span),
    /// The call's trace context and the fields known so far.
    Context {
        trace: TraceContext,
        user_id: Option<String>,
        order_id: Option<String>,
        event_id: Option<String>,
    },
}

impl Call {
    /// Starts tracing a call whose request metadata has `header`s.
    fn start(header: impl Fn(&str) -> Option<String>) -> Self {
        if telemetry::exporting() {
            let span = tracing::info_span!("CreateOrder", order_id = Empty, event_id = Empty, user_id = Empty);
            // Continue the caller's trace when it sent W3C trace context.
            telemetry::continue_trace(&span, header);
            Call::Span(span)
        } else {
            Call::Context {
                trace: TraceContext::continue_from(header),
                user_id: None,
                order_id: None,
                event_id: None,
            }
        }
    }

    /// The call's own span, if it has one.
    fn span(&self) -> Option<&tracing::Span> {
        match self {
            Call::Span(span) => Some(span),
            Call::Context { .. } => None,
        }
    }

    fn record(&mut self, field: Field, value: &str) {
        match self {
            Call::Span(span) => {
                let name = match field {
                    Field::User => "user_id",
                    Field::Order => "order_id",
                    Field::Event => "event_id",
                };
                span.record(name, value);
            }
            Call::Context {
                user_id,
                order_id,
                event_id,
                ..
            } => {
                let slot = match field {
                    Field::User => user_id,
                    Field::Order => order_id,
                    Field::Event => event_id,
                };
                *slot = Some(value.to_owned());
            }
        }
    }

    /// W3C trace headers for the event record.
    fn trace_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Call::Span(span) => telemetry::inject(span),
            Call::Context { trace, .. } => trace.headers(),
        }
    }

    /// The span a log line about this call goes in.
    fn log_span(&self) -> tracing::Span {
        match self {
            Call::Span(span) => span.clone(),
            Call::Context {
                trace,
                user_id,
                order_id,
                event_id,
            } => tracing::info_span!(
                "CreateOrder",
                order_id = order_id.as_deref(),
                event_id = event_id.as_deref(),
                user_id = user_id.as_deref(),
                trace_id = %trace.trace_id(),
            ),
        }
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let mut call = Call::start(|name| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        let order = match call.span().cloned() {
            Some(span) => self.handle(request, &mut call).instrument(span).await?,
            None => self.handle(request, &mut call).await?,
        };
        Ok(Response::new(CreateOrderResponse { order: Some(order) }))
    }
}
