//! The `orders.v1.OrderService` gRPC handler: validate, dedupe, publish, answer.

use std::sync::Arc;

use orders_contract::{
    envelope,
    v1::{CreateOrderRequest, CreateOrderResponse, Order, OrderCreated, order_service_server::OrderService},
};
use service_kit::telemetry;
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
    /// authenticated principal when authentication is on.
    pub async fn create(&self, request: CreateOrderRequest, caller: Option<Principal>) -> Result<Order, Error> {
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| Error::Overloaded(self.max_in_flight))?;
        let new = NewOrder::try_from(request).map_err(Error::InvalidOrder)?;
        if let Some(caller) = &caller {
            caller.authorize(&new.user_id)?;
        }
        let span = tracing::Span::current();
        span.record("user_id", new.user_id.as_str());
        match self.answers.lookup(&new) {
            Seen::New => {}
            Seen::Replay(order) => {
                span.record("order_id", order.order_id.as_str());
                tracing::debug!("idempotent replay");
                return Ok(order);
            }
            Seen::Conflict => {
                return Err(Error::IdempotencyConflict(new.request_id.unwrap_or_default()));
            }
        }

        let ids = idempotency::ids_for(&new);
        span.record("order_id", tracing::field::display(ids.order_id));
        span.record("event_id", tracing::field::display(ids.event_id));
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
        let event = OrderCreated {
            event_id: ids.event_id.to_string(),
            order: Some(order),
            occurred_at: Some(now),
        };
        let record = envelope::encode_order_created(&event, &self.ce_source);
        let trace_headers = telemetry::inject(&span);
        self.publisher.publish(&record, &trace_headers).await?;

        self.metrics.orders_created.inc();
        let order = event.order.unwrap_or_default();
        self.answers.remember(&new, &order);
        tracing::debug!(total_minor = order.total_minor, currency = %order.currency, "order created");
        Ok(order)
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let span = tracing::info_span!("CreateOrder", order_id = Empty, event_id = Empty, user_id = Empty);
        // Continue the caller's trace when it sent W3C trace context.
        telemetry::continue_trace(&span, |name| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        async move {
            let caller = match &self.auth {
                Some(auth) => match auth.authenticate(request.metadata()) {
                    Ok(principal) => Some(principal),
                    Err(error) => {
                        tracing::info!(%error, "call refused");
                        return Err(error.into());
                    }
                },
                None => None,
            };
            match self.create(request.into_inner(), caller).await {
                Ok(order) => Ok(Response::new(CreateOrderResponse { order: Some(order) })),
                Err(error) => {
                    match &error {
                        Error::InvalidOrder(_) | Error::IdempotencyConflict(_) => {
                            tracing::info!(%error, "order refused")
                        }
                        _ => tracing::warn!(%error, "order failed"),
                    }
                    Err(error.into())
                }
            }
        }
        .instrument(span)
        .await
    }
}
