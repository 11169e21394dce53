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
use service_kit::telemetry;
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
    /// `span` is the call's own, which the event's trace headers continue.
    async fn create(
        &self,
        request: CreateOrderRequest,
        caller: Option<Principal>,
        span: &tracing::Span,
    ) -> Result<Order, Error> {
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| Error::Overloaded(self.max_in_flight))?;
        let new = NewOrder::try_from(request).map_err(Error::InvalidOrder)?;
        span.record("user_id", new.user_id.as_str());
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
                span.record("order_id", order.order_id.as_str());
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
            span.record("order_id", order.order_id.as_str());
            let event = OrderCreated {
                event_id: ids.event_id.to_string(),
                order: Some(order),
                occurred_at: Some(created_at),
            };
            span.record("event_id", event.event_id.as_str());
            let encoded = envelope::encode_order_created(&event, &self.ce_source);
            let record = OutboxRecord {
                key: encoded.key,
                value: encoded.value,
                headers: encoded
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into_owned()))
                    .chain(telemetry::inject(span).into_iter().map(|(k, v)| (k.to_owned(), v)))
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

    /// Authenticates, creates, logs a refused or failed call. Runs inside
    /// `span`.
    async fn handle(&self, request: Request<CreateOrderRequest>, span: &tracing::Span) -> Result<Order, Status> {
        let created = match self.authenticate(request.metadata()) {
            Ok(caller) => self.create(request.into_inner(), caller, span).await,
            Err(error) => Err(error),
        };
        created.map_err(|error| {
            // The trace id goes on the log line only: a successful call logs
            // nothing at INFO, so it would be formatted for nobody.
            if let Some(trace_id) = telemetry::trace_id(span) {
                span.record("trace_id", trace_id.as_str());
            }
            match &error {
                Error::Unauthenticated(_) => tracing::info!(%error, "call refused"),
                Error::InvalidOrder(_) | Error::IdempotencyConflict(_) | Error::PermissionDenied(_) => {
                    tracing::info!(%error, "order refused")
                }
                _ => tracing::warn!(%error, "order failed"),
            }
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

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let span = tracing::info_span!(
            "CreateOrder",
            order_id = Empty,
            event_id = Empty,
            user_id = Empty,
            trace_id = Empty
        );
        // Continue the caller's trace when it sent W3C trace context.
        telemetry::continue_trace(&span, &telemetry::HttpHeaders(request.metadata().as_ref()));
        let order = self.handle(request, &span).instrument(span.clone()).await?;
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
