//! What a new connection is, from its first bytes.

/// What the first bytes of a connection say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An MQTT CONNECT packet (type 1, flags 0).
    Mqtt,
    /// An HTTP/1 request line (a method token).
    Http,
    /// A TLS handshake record (a ClientHello).
    Tls,
    Garbage,
}

/// Classifies from at least one byte: an MQTT connection starts with the
/// CONNECT fixed header byte 0x10; an HTTP one with an upper-case method
/// token. Anything else is garbage. More bytes are checked when present.
pub fn classify(first: &[u8]) -> Kind {
    match first.first() {
        Some(0x10) => Kind::Mqtt,
        Some(&super::tls::HANDSHAKE) => Kind::Tls,
        Some(b'A'..=b'Z') => {
            let token = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
            match first.get(token) {
                // A method is followed by a space; a short peek may end mid-token.
                None | Some(b' ') => Kind::Http,
                Some(_) => Kind::Garbage,
            }
        }
        _ => Kind::Garbage,
    }
}

/// Bytes as hex, for logs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_mqtt_http_and_garbage() {
        assert_eq!(classify(&[0x10, 0x0c, 0, 4]), Kind::Mqtt);
        assert_eq!(classify(b"GET /discover HTTP/1.1\r\n"), Kind::Http);
        assert_eq!(classify(b"DELETE /r"), Kind::Http);
        assert_eq!(classify(b"PU"), Kind::Http);
        assert_eq!(classify(b"GET/x"), Kind::Garbage);
        assert_eq!(classify(b"get / HTTP/1.1"), Kind::Garbage);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Kind::Tls, "TLS hello");
        assert_eq!(classify(&[0x30, 0x00]), Kind::Garbage, "PUBLISH first");
        assert_eq!(classify(b"\r\n"), Kind::Garbage);
    }
}
