//! The `orders.v1.OrderService` gRPC handler: CreateOrder (validate, dedupe
//! in the store, commit the order with its event, hand the event to the
//! outbox, answer), GetOrder and ListOrders.

use std::sync::Arc;

use orders_contract::{
    envelope,
    v1::{
        CreateOrderRequest, CreateOrderResponse, GetOrderRequest, GetOrderResponse, ListOrdersRequest,
        ListOrdersResponse, Order, OrderCreated, order_service_server::OrderService,
    },
};
use service_kit::telemetry::{self, TraceContext};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{Instrument, field::Empty};

use crate::{
    auth::{Authenticator, Principal},
    domain::NewOrder,
    error::Error,
    idempotency,
    metrics::Metrics,
    outbox::Outbox,
    pagination::{self, Cursor},
    store::{self, Created, OutboxRecord, Store, StoredOrder},
};

/// Serves `OrderService`.
#[derive(Debug)]
pub struct OrderApi {
    store: Arc<Store>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    ce_source: String,
    /// How long an idempotency key holds, in µs.
    retention_us: i64,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    auth: Option<Arc<Authenticator>>,
}

impl OrderApi {
    /// A handler on `store` whose events go out through `outbox`, answering
    /// at most `max_in_flight` CreateOrder calls at once (more are shed with
    /// RESOURCE_EXHAUSTED); idempotency keys hold for `retention`.
    pub fn new(
        store: Arc<Store>,
        outbox: Arc<Outbox>,
        metrics: Arc<Metrics>,
        ce_source: String,
        retention: std::time::Duration,
        max_in_flight: usize,
    ) -> Self {
        Self {
            store,
            outbox,
            metrics,
            ce_source,
            retention_us: i64::try_from(retention.as_micros()).unwrap_or(i64::MAX),
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

    /// The first call's order if `(user_id, request_id)` names a committed
    /// order still within the retention; a conflict if its payload differs.
    async fn replay(&self, new: &NewOrder, fingerprint: &[u8], not_before_us: i64) -> Result<Option<Order>, Error> {
        let Some(request_id) = &new.request_id else {
            return Ok(None);
        };
        let Some(key) = self.store.find_key(&new.user_id, request_id, not_before_us).await? else {
            return Ok(None);
        };
        if key.fingerprint != fingerprint {
            return Err(Error::IdempotencyConflict(request_id.clone()));
        }
        match self.store.get(&key.order_id).await? {
            Some(order) => Ok(Some(order)),
            None => Err(Error::Corrupt(format!(
                "idempotency key names order {} which is not stored",
                key.order_id
            ))),
        }
    }

    /// Creates an order: commits it with its event record in one
    /// transaction, then hands the record to the outbox and answers.
    /// `caller` is the authenticated principal when authentication is on;
    /// `call` carries the call's trace and collects what its log lines show.
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
        let fingerprint = new.request_id.is_some().then(|| idempotency::fingerprint(&new));
        // Two tries: a key taken by a concurrent call is read back on the
        // second; one that expired in between is taken over.
        for _ in 0..2 {
            let now_us = store::now_us();
            let not_before_us = now_us.saturating_sub(self.retention_us);
            if let Some(fingerprint) = &fingerprint
                && let Some(order) = self.replay(&new, fingerprint, not_before_us).await?
            {
                call.record(Field::Order, &order.order_id);
                tracing::debug!(order_id = %order.order_id, "idempotent replay");
                return Ok(order);
            }

            let ids = idempotency::new_ids();
            // Microseconds: what the store keeps, so a replay answers the
            // very same created_at.
            let created_at = store::timestamp_from_us(now_us);
            let order = Order {
                order_id: ids.order_id.to_string(),
                user_id: new.user_id.clone(),
                items: new.items.iter().map(Into::into).collect(),
                currency: new.currency.clone(),
                total_minor: new.total_minor,
                created_at: Some(created_at),
                request_id: new.request_id.clone().unwrap_or_default(),
            };
            call.record(Field::Order, &order.order_id);
            let event = OrderCreated {
                event_id: ids.event_id.to_string(),
                order: Some(order),
                occurred_at: Some(created_at),
            };
            call.record(Field::Event, &event.event_id);
            let encoded = envelope::encode_order_created(&event, &self.ce_source);
            let record = OutboxRecord {
                key: encoded.key,
                value: encoded.value,
                headers: encoded
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into_owned()))
                    .chain(call.trace_headers().into_iter().map(|(k, v)| (k.to_owned(), v)))
                    .collect(),
            };
            let order = event.order.unwrap_or_default();
            let stored = StoredOrder {
                order: &order,
                event_id: &event.event_id,
                fingerprint: fingerprint.as_ref().map(|f| f.as_slice()),
            };
            match self
                .store
                .create(&stored, &record, self.outbox.lease_until_us(), not_before_us)
                .await?
            {
                Created::New(outbox_id) => {
                    self.outbox.publish_now(outbox_id, &record);
                    self.metrics.orders_created.inc();
                    tracing::debug!(order_id = %order.order_id, total_minor = order.total_minor, currency = %order.currency, "order created");
                    return Ok(order);
                }
                Created::KeyTaken => continue,
            }
        }
        Err(Error::Corrupt(
            "the idempotency key was taken and released twice during one call".into(),
        ))
    }

    /// The caller, when authentication is on.
    fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Option<Principal>, Error> {
        match &self.auth {
            Some(auth) => auth.authenticate(metadata).map(Some),
            None => Ok(None),
        }
    }

    /// Authenticates, creates, logs a refused or failed call.
    async fn handle(&self, request: Request<CreateOrderRequest>, call: &mut Call) -> Result<Order, Status> {
        let caller = match self.authenticate(request.metadata()) {
            Ok(caller) => caller,
            Err(error) => {
                call.log_span().in_scope(|| tracing::info!(%error, "call refused"));
                return Err(error.into());
            }
        };
        self.create(request.into_inner(), caller, call).await.map_err(|error| {
            call.log_span().in_scope(|| match &error {
                Error::InvalidOrder(_) | Error::IdempotencyConflict(_) | Error::PermissionDenied(_) => {
                    tracing::info!(%error, "order refused")
                }
                _ => tracing::warn!(%error, "order failed"),
            });
            error.into()
        })
    }

    /// GetOrder: the order, NOT_FOUND when absent or another user's.
    async fn get(&self, request: Request<GetOrderRequest>) -> Result<Order, Error> {
        let caller = self.authenticate(request.metadata())?;
        let order_id = request.into_inner().order_id;
        if order_id.is_empty() {
            return Err(Error::InvalidField {
                field: "order_id",
                description: "must not be empty".into(),
            });
        }
        if order_id.len() > 128 {
            return Err(Error::NotFound(order_id.chars().take(128).collect()));
        }
        match self.store.get(&order_id).await? {
            Some(order) if caller.as_ref().is_none_or(|c| c.may_read(&order.user_id)) => Ok(order),
            _ => Err(Error::NotFound(order_id)),
        }
    }

    /// ListOrders: a page of one user's orders, newest first.
    async fn list(&self, request: Request<ListOrdersRequest>) -> Result<ListOrdersResponse, Error> {
        let caller = self.authenticate(request.metadata())?;
        let request = request.into_inner();
        if request.user_id.trim().is_empty() {
            return Err(Error::InvalidField {
                field: "user_id",
                description: "must not be empty".into(),
            });
        }
        if let Some(caller) = &caller
            && !caller.may_read(&request.user_id)
        {
            return Err(Error::PermissionDenied(format!(
                "token subject {:?} may not list the orders of user {:?}",
                caller.subject, request.user_id
            )));
        }
        let size = pagination::page_size(request.page_size)?;
        let cursor = pagination::decode(&request.user_id, &request.page_token)?;
        let mut orders = self
            .store
            .list(
                &request.user_id,
                cursor.as_ref().map(|c| (c.created_at_us, c.order_id.as_str())),
                size + 1,
            )
            .await?;
        let next_page_token = if orders.len() > size as usize {
            orders.truncate(size as usize);
            let last = orders.last().expect("a full page has a last order");
            pagination::encode(
                &request.user_id,
                &Cursor {
                    created_at_us: last
                        .created_at
                        .as_ref()
                        .map(store::us_from_timestamp)
                        .unwrap_or_default(),
                    order_id: last.order_id.clone(),
                },
            )
        } else {
            String::new()
        };
        Ok(ListOrdersResponse {
            orders,
            next_page_token,
        })
    }
}

/// Logs a refused or failed read call and turns its error into a status.
fn read_outcome<T>(method: &'static str, result: Result<T, Error>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|error| {
        let span = tracing::info_span!("call", method);
        span.in_scope(|| match &error {
            Error::Store(_) | Error::Corrupt(_) => tracing::warn!(%error, "read failed"),
            _ => tracing::debug!(%error, "read refused"),
        });
        error.into()
    })
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

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<GetOrderResponse>, Status> {
        read_outcome(
            "GetOrder",
            self.get(request)
                .await
                .map(|order| GetOrderResponse { order: Some(order) }),
        )
    }

    async fn list_orders(&self, request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        read_outcome("ListOrders", self.list(request).await)
    }
}
