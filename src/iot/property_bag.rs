//! Message property bags, the `key=value&...` tail of telemetry and C2D topics (protocol.md §4.6,
//! §4.7), and the `?$rid=..` query of twin, method and DPS topics, which has the same grammar.
//!
//! A key without `=` has a null value; `key=` is the empty string. Keys and values are
//! percent-decoded; `+` is kept literally.

use super::encoding::{DecodeError, url_decode, url_encode};

/// Ordered properties; order is kept so that encoding what was decoded gives the same text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyBag(pub Vec<(String, Option<String>)>);

impl PropertyBag {
    /// Parses a bag. A leading `?` (Edge docs style) and a trailing `/` are tolerated.
    pub fn parse(text: &str) -> Result<PropertyBag, DecodeError> {
        let text = text.strip_prefix('?').unwrap_or(text);
        let text = text.strip_suffix('/').unwrap_or(text);
        let mut items = Vec::new();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = match pair.split_once('=') {
                Some((k, v)) => (k, Some(url_decode(v)?)),
                None => (pair, None),
            };
            items.push((url_decode(k)?, v));
        }
        Ok(PropertyBag(items))
    }

    /// Encodes with every key and value percent-encoded, as the SDKs do (`$` becomes `%24`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(&url_encode(k));
            if let Some(v) = v {
                out.push('=');
                out.push_str(&url_encode(v));
            }
        }
        out
    }

    /// The first value of a key (null values read as `None`).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), Some(value.into())));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sdk_and_docs_forms() {
        let b = PropertyBag::parse("%24.mid=42&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp").unwrap();
        assert_eq!(b.get("$.mid"), Some("42"));
        assert_eq!(b.get("$.ct"), Some("application/json"));
        assert_eq!(b.get("alert"), Some("high temp"));
        let literal = PropertyBag::parse("?$.ct=application%2Fjson&$.ce=utf-8").unwrap();
        assert_eq!(literal.get("$.ce"), Some("utf-8"));
        let nulls = PropertyBag::parse("prop1&prop2=&prop3=a%20string/").unwrap();
        assert_eq!(
            nulls.0,
            vec![("prop1".into(), None), ("prop2".into(), Some("".into())), ("prop3".into(), Some("a string".into()))]
        );
        assert_eq!(PropertyBag::parse("a=1+2").unwrap().get("a"), Some("1+2"));
        assert!(PropertyBag::parse("").unwrap().is_empty());
        assert!(PropertyBag::parse("a=%zz").is_err());
    }

    #[test]
    fn encodes_what_it_parsed() {
        let text = "iothub-ack=full&%24.to=%2Fdevices%2Fd%2Fmessages%2FdeviceBound&%24.cid=123&flag";
        assert_eq!(PropertyBag::parse(text).unwrap().encode(), text);
    }
}
