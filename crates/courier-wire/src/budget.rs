//! The decoded-size budget: a MessagePack body is walked once, allocating
//! nothing, before serde turns it into values, so that a small body cannot
//! expand into a large value (8 MiB of empty strings is 8 million `String`s,
//! 190 MiB in memory).
//!
//! The decoded size of a body is counted as its string, binary and extension
//! bytes plus [`VALUE_COST`] bytes for every value (map keys included); it is bounded by
//! the decompressed limit, at encode and at decode, so the value a decoder
//! builds stays within that limit too.

use rmp::Marker;

/// What every MessagePack value counts for beyond its bytes: a generous bound
/// on what the smallest Rust value it can become costs in memory (a `String`
/// or `Vec` header is 24 bytes; an entry of a `BTreeMap` of structs, with its
/// share of a half-full node, a few hundred over the several values it takes).
pub(crate) const VALUE_COST: usize = 128;
/// Deepest nesting of arrays and maps accepted. Courier's messages nest a
/// handful of levels (tool-call arguments are JSON, a dozen at most).
pub(crate) const MAX_DEPTH: usize = 64;

/// Why a body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OverBudget {
    /// The decoded size would exceed the limit.
    Size,
    /// Arrays and maps nest deeper than [`MAX_DEPTH`].
    Depth,
}

/// Walk the first MessagePack value of `body`; refuse it when its decoded
/// size exceeds `limit` or it nests past [`MAX_DEPTH`].
///
/// Malformed or truncated input is not judged here: the walk stops there and
/// serde reports it, having read no further than this walk did.
pub(crate) fn check(body: &[u8], limit: usize) -> Result<(), OverBudget> {
    match walk(body, limit) {
        Err(Stop::Over(over)) => Err(over),
        Ok(()) | Err(Stop::Malformed) => Ok(()),
    }
}

/// Why a walk ended early.
enum Stop {
    Over(OverBudget),
    Malformed,
}

fn walk(body: &[u8], limit: usize) -> Result<(), Stop> {
    let mut pos = 0usize;
    let mut cost = 0usize;
    // Values still to read in each open array or map, innermost last; the
    // outermost entry is the one top-level value.
    let mut open: Vec<u64> = Vec::with_capacity(MAX_DEPTH + 1);
    open.push(1);
    while let Some(left) = open.last_mut() {
        if *left == 0 {
            open.pop();
            continue;
        }
        *left -= 1;
        let byte = *body.get(pos).ok_or(Stop::Malformed)?;
        pos += 1;
        let mut len = |width| length(body, &mut pos, width);
        // Bytes the value's data takes, and how many values it contains.
        let (data, children): (usize, u64) = match Marker::from_u8(byte) {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => (0, 0),
            Marker::U8 | Marker::I8 => (1, 0),
            Marker::U16 | Marker::I16 => (2, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
            Marker::FixStr(n) => (usize::from(n), 0),
            Marker::Str8 | Marker::Bin8 => (len(1)?, 0),
            Marker::Str16 | Marker::Bin16 => (len(2)?, 0),
            Marker::Str32 | Marker::Bin32 => (len(4)?, 0),
            // Extensions: a type byte, then the data.
            Marker::FixExt1 => (2, 0),
            Marker::FixExt2 => (3, 0),
            Marker::FixExt4 => (5, 0),
            Marker::FixExt8 => (9, 0),
            Marker::FixExt16 => (17, 0),
            Marker::Ext8 => (len(1)? + 1, 0),
            Marker::Ext16 => (len(2)? + 1, 0),
            Marker::Ext32 => (len(4)?.saturating_add(1), 0),
            Marker::FixArray(n) => (0, u64::from(n)),
            Marker::FixMap(n) => (0, 2 * u64::from(n)),
            Marker::Array16 => (0, len(2)? as u64),
            Marker::Array32 => (0, len(4)? as u64),
            Marker::Map16 => (0, 2 * len(2)? as u64),
            Marker::Map32 => (0, 2 * len(4)? as u64),
            Marker::Reserved => return Err(Stop::Malformed),
        };
        if data > body.len() - pos {
            return Err(Stop::Malformed);
        }
        pos += data;
        // A number's bytes become a field of its value: only strings,
        // binaries and extensions bring data of their own.
        let own = if is_number(Marker::from_u8(byte)) { 0 } else { data };
        cost = cost.saturating_add(VALUE_COST + own);
        if cost > limit {
            return Err(Stop::Over(OverBudget::Size));
        }
        if children > 0 {
            // `open` holds the top-level entry plus one per nesting level.
            if open.len() > MAX_DEPTH {
                return Err(Stop::Over(OverBudget::Depth));
            }
            open.push(children);
        }
    }
    Ok(())
}

fn is_number(marker: Marker) -> bool {
    matches!(
        marker,
        Marker::U8
            | Marker::U16
            | Marker::U32
            | Marker::U64
            | Marker::I8
            | Marker::I16
            | Marker::I32
            | Marker::I64
            | Marker::F32
            | Marker::F64
    )
}

/// Read a big-endian length of `width` bytes at `pos`, moving past it.
fn length(body: &[u8], pos: &mut usize, width: usize) -> Result<usize, Stop> {
    let bytes = body.get(*pos..*pos + width).ok_or(Stop::Malformed)?;
    *pos += width;
    Ok(bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    /// The decoded size of a JSON value by the rule, computed from the value.
    fn decoded_size(value: &Value) -> usize {
        VALUE_COST
            + match value {
                Value::String(s) => s.len(),
                Value::Array(items) => items.iter().map(decoded_size).sum(),
                Value::Object(map) => map.iter().map(|(k, v)| VALUE_COST + k.len() + decoded_size(v)).sum(),
                Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            }
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,300}".prop_map(Value::from),
        ];
        // Up to 20 items, so arrays and maps take both their fix and 16-bit forms.
        leaf.prop_recursive(5, 300, 20, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..20).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,20}", inner, 0..20)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The walk agrees with the encoder on every shape: a value costs
        /// exactly its decoded size, one byte less is over the budget.
        #[test]
        fn the_walk_counts_exactly_what_the_encoder_wrote(value in json()) {
            let b = body(&value);
            let size = decoded_size(&value);
            prop_assert_eq!(check(&b, size), Ok(()));
            prop_assert_eq!(check(&b, size - 1), Err(OverBudget::Size));
        }
    }

    fn body<T: serde::Serialize>(value: &T) -> Vec<u8> {
        rmp_serde::to_vec_named(value).expect("encode")
    }

    #[test]
    fn counts_every_value_and_the_bytes_of_strings() {
        // ["ab", ""]: the array, two strings, two string bytes.
        let b = body(&vec!["ab", ""]);
        assert_eq!(check(&b, 3 * VALUE_COST + 2), Ok(()));
        assert_eq!(check(&b, 3 * VALUE_COST + 1), Err(OverBudget::Size));
    }

    #[test]
    fn counts_map_keys_and_binary_bytes() {
        // {"k": bin(5)}: the map, the key (1 byte), the binary (5 bytes).
        let value = std::collections::BTreeMap::from([("k", serde_bytes::ByteBuf::from(vec![0u8; 5]))]);
        let b = body(&value);
        assert_eq!(check(&b, 3 * VALUE_COST + 6), Ok(()));
        assert_eq!(check(&b, 3 * VALUE_COST + 5), Err(OverBudget::Size));
    }

    #[test]
    fn refuses_nesting_past_the_maximum_depth() {
        let nested = |depth: usize| {
            let mut b = vec![0x91; depth];
            b.push(0xc0);
            b
        };
        assert_eq!(check(&nested(MAX_DEPTH), usize::MAX), Ok(()));
        assert_eq!(check(&nested(MAX_DEPTH + 1), usize::MAX), Err(OverBudget::Depth));
    }

    #[test]
    fn a_claimed_length_costs_nothing_until_its_data_is_there() {
        // An array claiming 4 billion values, a string and binary claiming
        // 4 GiB, with nothing behind them: truncated, for serde to report.
        assert_eq!(check(&[0xdd, 0xff, 0xff, 0xff, 0xff], VALUE_COST), Ok(()));
        assert_eq!(check(&[0xdb, 0xff, 0xff, 0xff, 0xff], VALUE_COST), Ok(()));
        assert_eq!(check(&[0xc6, 0xff, 0xff, 0xff, 0xff], VALUE_COST), Ok(()));
    }

    #[test]
    fn many_small_values_exhaust_the_budget() {
        // 10,000 empty strings: 10 KB on the wire, far more in memory.
        let b = body(&vec![""; 10_000]);
        assert!(b.len() < 10_010);
        assert_eq!(check(&b, 10_001 * VALUE_COST), Ok(()));
        assert_eq!(check(&b, 10_000 * VALUE_COST), Err(OverBudget::Size));
    }

    #[test]
    fn stops_at_truncated_or_reserved_input() {
        assert_eq!(check(&[], 0), Ok(()));
        assert_eq!(check(&[0xda, 0x01], 1 << 20), Ok(()));
        assert_eq!(check(&[0xa5, b'a'], 1 << 20), Ok(()));
        assert_eq!(check(&[0xc1], 1 << 20), Ok(()));
    }
}
