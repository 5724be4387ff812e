//! Cheap parsing of what subscribers receive. At a million deliveries per second a full
//! serde parse per message would cost the load tool more CPU than the server spends
//! sending it, so the hot path finds `"offset":` and `"t":` by byte search instead.
//! The envelope shape is fixed by the server (`{"topic":..,"offset":N,"data":...}`) and the
//! payload by the tool itself (`{"seq":..,"t":..,"pad":..}`); a test checks this parser
//! against serde on sample envelopes.

/// Where `needle` first occurs in `hay`.
#[inline]
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while from + needle.len() <= hay.len() {
        let i = from
            + hay[from..=hay.len() - needle.len()]
                .iter()
                .position(|&b| b == first)?;
        if &hay[i + 1..i + needle.len()] == rest {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

/// The unsigned integer right after `key` (optional spaces allowed after the colon).
#[inline]
pub fn u64_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let start = find(hay, key)? + key.len();
    let mut digits = hay[start..].iter().skip_while(|&&b| b == b' ').peekable();
    digits.peek().filter(|b| b.is_ascii_digit())?;
    let mut n: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(n)
}

/// One publication as the tool needs it: its offset and, if the payload carries it, the
/// send time in microseconds since the UNIX epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub offset: u64,
    pub sent_us: Option<u64>,
}

/// Parses a publication envelope. `"offset":` is searched from the start (a topic name
/// cannot contain a quote, so the first match is the envelope's own) and `"t":` only
/// after `"data":`.
#[inline]
pub fn delivery(env: &[u8]) -> Option<Delivery> {
    let offset = u64_after(env, b"\"offset\":")?;
    let data = find(env, b"\"data\":")?;
    let sent_us = u64_after(&env[data..], b"\"t\":");
    Some(Delivery { offset, sent_us })
}

/// What a text frame from the server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Publication(Delivery),
    /// `{"op":"subscribed",...,"offset":N}`: the topic's last offset at subscribe time.
    Subscribed(u64),
    Other,
}

#[inline]
pub fn classify(text: &[u8]) -> Frame {
    if text.starts_with(b"{\"op\":") || find(&text[..text.len().min(16)], b"\"op\"").is_some() {
        if find(text, b"\"subscribed\"").is_some() {
            if let Some(o) = u64_after(text, b"\"offset\":") {
                return Frame::Subscribed(o);
            }
        }
        return Frame::Other;
    }
    match delivery(text) {
        Some(d) => Frame::Publication(d),
        None => Frame::Other,
    }
}

/// The JSON body the tool publishes: sequence number and send time, padded with `x` to
/// `size` bytes (or longer, if `size` is below the unpadded length).
pub fn payload(seq: u64, sent_us: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"seq\":{seq},\"t\":{sent_us},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut v = Vec::with_capacity(head.len() + pad + 2);
    v.extend_from_slice(head.as_bytes());
    v.resize(head.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_view(env: &[u8]) -> (u64, Option<u64>) {
        let v: serde_json::Value = serde_json::from_slice(env).unwrap();
        (v["offset"].as_u64().unwrap(), v["data"]["t"].as_u64())
    }

    #[test]
    fn fast_parser_agrees_with_serde() {
        let samples: Vec<Vec<u8>> = vec![
            br#"{"topic":"bench","offset":1,"data":{"seq":0,"t":1712345678901234,"pad":"xx"}}"#
                .to_vec(),
            br#"{"topic":"t","offset":18446744073709551615,"data":{"t":5}}"#.to_vec(),
            br#"{"topic":"a.b:c","offset":42,"data":[1,2,3]}"#.to_vec(),
            br#"{"topic":"x","offset":7,"data":{"seq":1,"t": 99,"pad":""}}"#.to_vec(),
            // A "t" key only inside a string value must not be taken as the send time.
            br#"{"topic":"x","offset":8,"data":"\"t\"is text"}"#.to_vec(),
            br#"{"topic":"offset","offset":9,"data":{"nested":{"a":1},"t":3}}"#.to_vec(),
        ];
        for s in &samples {
            let fast = delivery(s).unwrap();
            let (offset, t) = serde_view(s);
            assert_eq!(fast.offset, offset, "{}", String::from_utf8_lossy(s));
            assert_eq!(fast.sent_us, t, "{}", String::from_utf8_lossy(s));
            assert_eq!(classify(s), Frame::Publication(fast));
        }
        // Envelopes around the tool's own payloads, every size from tiny to large.
        for (i, size) in [0usize, 10, 40, 100, 1000, 4096].into_iter().enumerate() {
            let p = payload(i as u64, 1_700_000_000_000_000 + i as u64, size);
            let body: serde_json::Value = serde_json::from_slice(&p).unwrap();
            assert!(p.len() >= size);
            if size >= 60 {
                assert_eq!(p.len(), size);
            }
            // The server's envelope: {"topic":..,"offset":..,"data":<the body verbatim>}.
            let mut env = format!(r#"{{"topic":"bench","offset":{},"data":"#, 100 + i).into_bytes();
            env.extend_from_slice(&p);
            env.push(b'}');
            let fast = delivery(&env).unwrap();
            assert_eq!((fast.offset, fast.sent_us), serde_view(&env), "{body}");
        }
    }

    #[test]
    fn replies_are_classified() {
        assert_eq!(
            classify(br#"{"op":"subscribed","topic":"bench","offset":41,"epoch":"9f1c2a7b"}"#),
            Frame::Subscribed(41)
        );
        assert_eq!(classify(br#"{"op":"pong","id":3}"#), Frame::Other);
        assert_eq!(classify(b"not json"), Frame::Other);
        assert_eq!(delivery(br#"{"topic":"x","offset":-1,"data":1}"#), None);
    }

    #[test]
    fn find_edge_cases() {
        assert_eq!(find(b"abc", b""), None);
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"aab", b"ab"), Some(1));
        assert_eq!(find(b"xxab", b"ab"), Some(2));
        assert_eq!(u64_after(b"\"k\":", b"\"k\":"), None);
    }
}
