//! The order domain: a [`NewOrder`] can only be built from a request that
//! passes every rule, so nothing invalid gets past the gRPC edge.

use orders_contract::v1::{CreateOrderRequest, LineItem as ProtoLineItem};

/// Most lines one order may have.
pub const MAX_ITEMS: usize = 100;
/// Longest SKU, in characters.
pub const MAX_SKU_CHARS: usize = 64;
/// Longest user id and request id, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// What a field with a control character is told.
const NO_CONTROL: &str = "must not contain control characters (such as line breaks)";

/// One rule a request broke: the field (as a path such as `items[2].sku`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// A validated line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LineItem {
    /// 1 to 64 characters, no control characters.
    pub sku: String,
    /// At least 1.
    pub quantity: u32,
    /// 0 or more, in the currency's minor unit.
    pub unit_price_minor: i64,
}

/// A validated request to create an order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NewOrder {
    /// Not blank, at most 128 characters, no control characters.
    pub user_id: String,
    /// Three upper-case ASCII letters.
    pub currency: String,
    /// 1 to 100 lines.
    pub items: Vec<LineItem>,
    /// Sum of quantity * unit price; fits in an i64.
    pub total_minor: i64,
    /// The caller's idempotency key, if any: at most 128 characters, no
    /// control characters.
    pub request_id: Option<String>,
}

impl TryFrom<CreateOrderRequest> for NewOrder {
    type Error = Vec<FieldViolation>;

    fn try_from(req: CreateOrderRequest) -> Result<Self, Self::Error> {
        let mut violations = Vec::new();
        if req.user_id.trim().is_empty() {
            violations.push(FieldViolation::new("user_id", "must not be empty"));
        } else if req.user_id.chars().count() > MAX_ID_CHARS {
            violations.push(FieldViolation::new(
                "user_id",
                format!("must be at most {MAX_ID_CHARS} characters"),
            ));
        } else if has_control(&req.user_id) {
            violations.push(FieldViolation::new("user_id", NO_CONTROL));
        }
        if !is_currency_code(&req.currency) {
            violations.push(FieldViolation::new(
                "currency",
                format!(
                    "must be an ISO 4217 code of three upper-case letters, got {:?}",
                    truncate(&req.currency)
                ),
            ));
        }
        if req.request_id.chars().count() > MAX_ID_CHARS {
            violations.push(FieldViolation::new(
                "request_id",
                format!("must be at most {MAX_ID_CHARS} characters"),
            ));
        } else if has_control(&req.request_id) {
            violations.push(FieldViolation::new("request_id", NO_CONTROL));
        }
        if req.items.is_empty() || req.items.len() > MAX_ITEMS {
            violations.push(FieldViolation::new(
                "items",
                format!("must have 1 to {MAX_ITEMS} items, got {}", req.items.len()),
            ));
        }
        let mut items = Vec::with_capacity(req.items.len().min(MAX_ITEMS));
        let mut total: Option<i64> = Some(0);
        for (i, item) in req.items.into_iter().take(MAX_ITEMS).enumerate() {
            if let Some(item) = validate_item(i, item, &mut violations) {
                total = total.and_then(|t| {
                    i64::from(item.quantity)
                        .checked_mul(item.unit_price_minor)
                        .and_then(|l| t.checked_add(l))
                });
                items.push(item);
            }
        }
        let total_minor = match total {
            Some(t) => t,
            None => {
                violations.push(FieldViolation::new(
                    "items",
                    "order total does not fit in a signed 64-bit integer",
                ));
                0
            }
        };
        if !violations.is_empty() {
            return Err(violations);
        }
        Ok(NewOrder {
            user_id: req.user_id,
            currency: req.currency,
            items,
            total_minor,
            request_id: (!req.request_id.is_empty()).then_some(req.request_id),
        })
    }
}

fn validate_item(i: usize, item: ProtoLineItem, violations: &mut Vec<FieldViolation>) -> Option<LineItem> {
    let before = violations.len();
    let sku_chars = item.sku.chars().count();
    if sku_chars == 0 || sku_chars > MAX_SKU_CHARS {
        violations.push(FieldViolation::new(
            format!("items[{i}].sku"),
            format!("must be 1 to {MAX_SKU_CHARS} characters, got {sku_chars}"),
        ));
    } else if has_control(&item.sku) {
        violations.push(FieldViolation::new(format!("items[{i}].sku"), NO_CONTROL));
    }
    if item.quantity < 1 {
        violations.push(FieldViolation::new(
            format!("items[{i}].quantity"),
            "must be at least 1",
        ));
    }
    if item.unit_price_minor < 0 {
        violations.push(FieldViolation::new(
            format!("items[{i}].unit_price_minor"),
            format!("must be 0 or more, got {}", item.unit_price_minor),
        ));
    }
    (violations.len() == before).then_some(LineItem {
        sku: item.sku,
        quantity: item.quantity,
        unit_price_minor: item.unit_price_minor,
    })
}

/// Whether `s` has a character that can break a line or a terminal where it
/// is shown: a control character (C0, DEL, C1) or a Unicode line or paragraph
/// separator. Identifiers end up in log lines and other systems' records.
fn has_control(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
}

fn is_currency_code(s: &str) -> bool {
    s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase())
}

fn truncate(s: &str) -> String {
    s.chars().take(16).collect()
}

impl From<&LineItem> for ProtoLineItem {
    fn from(item: &LineItem) -> Self {
        ProtoLineItem {
            sku: item.sku.clone(),
            quantity: item.quantity,
            unit_price_minor: item.unit_price_minor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, quantity: u32, price: i64) -> ProtoLineItem {
        ProtoLineItem {
            sku: sku.into(),
            quantity,
            unit_price_minor: price,
        }
    }

    fn valid() -> CreateOrderRequest {
        CreateOrderRequest {
            user_id: "user-1".into(),
            currency: "EUR".into(),
            items: vec![item("SKU-1", 2, 1999), item("SKU-2", 1, 1)],
            request_id: String::new(),
        }
    }

    fn fields(req: CreateOrderRequest) -> Vec<String> {
        NewOrder::try_from(req)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn a_valid_request_becomes_an_order_with_its_total() {
        let order = NewOrder::try_from(valid()).unwrap();
        assert_eq!(order.total_minor, 2 * 1999 + 1);
        assert_eq!(order.items.len(), 2);
        assert_eq!(order.request_id, None);
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut r = valid();
        r.user_id = "  ".into();
        assert_eq!(fields(r), ["user_id"]);

        for bad in ["", "eur", "EURO", "E1R", "ÉUR"] {
            let mut r = valid();
            r.currency = bad.into();
            assert_eq!(fields(r), ["currency"], "{bad:?}");
        }

        let mut r = valid();
        r.items.clear();
        assert_eq!(fields(r), ["items"]);

        let mut r = valid();
        r.items = (0..=MAX_ITEMS).map(|i| item(&format!("S{i}"), 1, 1)).collect();
        assert_eq!(fields(r), ["items"]);

        let mut r = valid();
        r.items = vec![
            item("", 1, 1),
            item(&"x".repeat(65), 1, 1),
            item("ok", 0, 1),
            item("ok", 1, -1),
        ];
        assert_eq!(
            fields(r),
            [
                "items[0].sku",
                "items[1].sku",
                "items[2].quantity",
                "items[3].unit_price_minor"
            ]
        );

        let mut r = valid();
        r.request_id = "r".repeat(MAX_ID_CHARS + 1);
        assert_eq!(fields(r), ["request_id"]);
    }

    #[test]
    fn control_characters_are_refused_in_every_string_field() {
        for bad in [
            "a\nb",
            "a\rb",
            "\tx",
            "x\u{0}",
            "x\u{1b}[31m",
            "x\u{7f}",
            "x\u{85}",
            "x\u{2028}",
        ] {
            let mut r = valid();
            r.user_id = bad.into();
            r.request_id = bad.into();
            r.currency = bad.into();
            r.items[1].sku = bad.into();
            assert_eq!(
                fields(r),
                ["user_id", "currency", "request_id", "items[1].sku"],
                "{bad:?}"
            );
        }
        let mut r = valid();
        r.user_id = "ünïcödé user ✓".into();
        r.request_id = "key with spaces".into();
        r.items[0].sku = "SKU é".into();
        assert!(NewOrder::try_from(r).is_ok(), "printable Unicode is fine");
    }

    #[test]
    fn limits_are_inclusive() {
        let mut r = valid();
        r.items = (0..MAX_ITEMS).map(|_| item(&"é".repeat(MAX_SKU_CHARS), 1, 0)).collect();
        r.user_id = "u".repeat(MAX_ID_CHARS);
        assert!(NewOrder::try_from(r).is_ok());
    }

    #[test]
    fn a_total_that_overflows_is_refused() {
        let mut r = valid();
        r.items = vec![item("A", u32::MAX, i64::MAX / 2)];
        assert_eq!(fields(r), ["items"]);
    }

    #[test]
    fn all_violations_are_reported_at_once() {
        let r = CreateOrderRequest {
            user_id: String::new(),
            currency: "x".into(),
            items: vec![],
            request_id: String::new(),
        };
        assert_eq!(fields(r), ["user_id", "currency", "items"]);
    }
}
