//! Message properties as IoT Hub's device REST API carries them: the HTTP headers of a
//! device-to-cloud message (`POST /devices/{id}/messages/events`) and of a cloud-to-device one
//! (`GET /devices/{id}/messages/deviceBound`), and the `properties` object of a batch item. The
//! MQTT property bag names system properties `$.mid`, `$.cid`, ...; HTTPS names the same ones
//! `iothub-messageid`, `iothub-correlationid`, ..., and application properties
//! `iothub-app-<name>` (Microsoft docs: "Send Device Event" and "Receive Device Bound
//! Notification" REST references; "Create and read IoT Hub messages", system properties).

use super::property_bag::PropertyBag;

/// The prefix of application properties.
pub const APP_PREFIX: &str = "iothub-app-";

/// System properties: the property-bag key, and the header that carries it over HTTPS.
pub const SYSTEM: &[(&str, &str)] = &[
    ("$.mid", "iothub-messageid"),
    ("$.cid", "iothub-correlationid"),
    ("$.uid", "iothub-userid"),
    ("$.ct", "iothub-contenttype"),
    ("$.ce", "iothub-contentencoding"),
    ("$.exp", "iothub-expiry"),
    ("$.to", "iothub-to"),
    ("iothub-ack", "iothub-ack"),
    ("iothub-creation-time-utc", "iothub-creation-time-utc"),
    ("$.ifid", "iothub-interface-id"),
    // A Plug and Play component name, sent without the prefix (the Node SDK's `dt-subject`).
    ("$.sub", "dt-subject"),
];

/// The header name of a property-bag key: system properties by the table, the rest as
/// application properties.
pub fn header_name(key: &str) -> String {
    match SYSTEM.iter().find(|(k, _)| *k == key) {
        Some((_, h)) => (*h).to_owned(),
        None => format!("{APP_PREFIX}{key}"),
    }
}

/// The property-bag key of a header, if it carries a message property (header names are
/// case-insensitive: compared in ASCII lower case).
pub fn property_key(header: &str) -> Option<String> {
    let lower = header.to_ascii_lowercase();
    if let Some(app) = lower.strip_prefix(APP_PREFIX) {
        // The application property keeps its name as sent, after the prefix.
        return (!app.is_empty()).then(|| header[APP_PREFIX.len()..].to_owned());
    }
    SYSTEM.iter().find(|(_, h)| *h == lower).map(|(k, _)| (*k).to_owned())
}

/// The properties of a bag as (header, value) pairs; properties without a value are left out
/// (a header always has one).
pub fn to_headers(bag: &PropertyBag) -> Vec<(String, String)> {
    bag.iter().filter_map(|(k, v)| Some((header_name(k), v?.to_owned()))).collect()
}

/// The message properties among `headers`, in the order given.
pub fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> PropertyBag {
    let mut bag = PropertyBag::default();
    for (h, v) in headers {
        if let Some(k) = property_key(h) {
            bag.push(k, v);
        }
    }
    bag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_and_application_properties_map_both_ways() {
        let bag =
            PropertyBag::parse("%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&fleetsim-seq=r%3A1&alert").unwrap();
        let headers = to_headers(&bag);
        assert_eq!(
            headers,
            vec![
                ("iothub-messageid".to_owned(), "m1".to_owned()),
                ("iothub-contenttype".to_owned(), "application/json".to_owned()),
                ("iothub-contentencoding".to_owned(), "utf-8".to_owned()),
                ("iothub-app-fleetsim-seq".to_owned(), "r:1".to_owned()),
            ]
        );
        let back = from_headers(headers.iter().map(|(h, v)| (h.as_str(), v.as_str())));
        assert_eq!(back.get("$.mid"), Some("m1"));
        assert_eq!(back.get("fleetsim-seq"), Some("r:1"));
        assert_eq!(back.0.len(), 4);
    }

    #[test]
    fn header_names_are_case_insensitive_and_others_ignored() {
        assert_eq!(property_key("IoTHub-MessageId").as_deref(), Some("$.mid"));
        assert_eq!(property_key("IOTHUB-APP-Temp").as_deref(), Some("Temp"));
        assert_eq!(property_key("iothub-app-"), None);
        assert_eq!(property_key("DT-Subject").as_deref(), Some("$.sub"));
        assert_eq!(property_key("content-type"), None);
        assert_eq!(property_key("authorization"), None);
    }
}
