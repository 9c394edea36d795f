//! JSON read strictly: an object with the same key twice is refused at any
//! depth. RFC 8259 leaves such an object's meaning to the reader (serde
//! keeps the last value, others the first), so a record such as
//! `{"host":"10.0.0.5","port":80,"host":"6.6.6.6"}` would name one endpoint
//! to the registry and another to some watcher.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Starts the message of a duplicate key's error.
pub const DUPLICATE: &str = "duplicate key";

/// A JSON value without duplicate keys.
pub struct Strict(pub Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("{DUPLICATE} `{key}`")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(s: &str) -> Result<Value, String> {
        serde_json::from_str::<Strict>(s)
            .map(|s| s.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_same_values_as_serde_json_without_duplicates() {
        for s in [
            r#"{"a":1,"b":[true,null,-2,2.5,"x",{"c":{}}],"d":18446744073709551615}"#,
            "[]",
            "\"\\u00e9\"",
        ] {
            assert_eq!(
                strict(s).unwrap(),
                serde_json::from_str::<Value>(s).unwrap()
            );
        }
    }

    #[test]
    fn a_duplicate_key_is_refused_at_any_depth() {
        let e = strict(r#"{"host":"10.0.0.5","port":80,"host":"6.6.6.6"}"#).unwrap_err();
        assert!(e.starts_with("duplicate key `host`"), "{e}");
        let e = strict(r#"{"meta":{"a":1,"a":2}}"#).unwrap_err();
        assert!(e.starts_with("duplicate key `a`"), "{e}");
        let e = strict(r#"[{"x":1},{"y":1,"y":1}]"#).unwrap_err();
        assert!(e.starts_with("duplicate key `y`"), "{e}");
        // The same key in sibling objects is no duplicate.
        assert!(strict(r#"{"a":{"k":1},"b":{"k":1}}"#).is_ok());
    }
}
