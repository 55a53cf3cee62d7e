//! Which protocol upgrades may pass the mesh: only WebSocket. Any other `Upgrade` (notably
//! `h2c`, with `Connection: Upgrade, HTTP2-Settings`) is stripped, with the `Connection` tokens
//! naming it and `HTTP2-Settings`, and the request goes on as a plain request: an app that
//! accepted an `h2c` upgrade would turn the connection into a tunnel past every per-request
//! policy of the mesh ("h2c smuggling").

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderName, HeaderValue, Request};

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Strips an upgrade the mesh does not carry; true when it did.
pub fn strip_unknown<B>(req: &mut Request<B>) -> bool {
    let ups = req.headers().get_all(UPGRADE);
    if ups.iter().next().is_none() {
        return false;
    }
    // Every `Upgrade` line counts: a second one must not carry `h2c` past a first `websocket`.
    let websocket = ups.iter().all(|up| {
        up.to_str().is_ok_and(|v| {
            v.split(',').all(|p| {
                p.trim()
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .eq_ignore_ascii_case("websocket")
            })
        })
    });
    if websocket {
        return false;
    }
    let asked = ups
        .iter()
        .map(|up| up.to_str().unwrap_or("(not text)"))
        .collect::<Vec<_>>()
        .join(", ");
    let headers = req.headers_mut();
    headers.remove(UPGRADE);
    headers.remove(HTTP2_SETTINGS);
    let kept: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("upgrade")
                && !t.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_owned)
        .collect();
    headers.remove(CONNECTION);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(CONNECTION, v);
        }
    }
    tracing::info!(upgrade = %asked, "stripped an upgrade the mesh does not carry");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(upgrade: &str, connection: &str) -> Request<()> {
        Request::get("/")
            .header(UPGRADE, upgrade)
            .header(CONNECTION, connection)
            .header(HTTP2_SETTINGS, "AAMAAABkAARAAAAAAAIAAAAA")
            .body(())
            .unwrap()
    }

    #[test]
    fn h2c_is_stripped_and_websocket_passes() {
        let mut r = req("h2c", "Upgrade, HTTP2-Settings, keep-alive");
        assert!(strip_unknown(&mut r));
        assert!(r.headers().get(UPGRADE).is_none());
        assert!(r.headers().get(HTTP2_SETTINGS).is_none());
        assert_eq!(r.headers()[CONNECTION], "keep-alive");
        let mut r = req("h2c", "Upgrade, HTTP2-Settings");
        assert!(strip_unknown(&mut r));
        assert!(r.headers().get(CONNECTION).is_none());
        let mut r = req("websocket", "Upgrade");
        assert!(!strip_unknown(&mut r));
        assert_eq!(r.headers()[UPGRADE], "websocket");
        // A list with anything but WebSocket in it is not WebSocket.
        let mut r = req("websocket, h2c", "Upgrade");
        assert!(strip_unknown(&mut r));
        // Nor is a second `Upgrade` line after a first `websocket` (found by the property
        // test in `front_door_props.rs`).
        let mut r = req("websocket", "Upgrade");
        r.headers_mut()
            .append(UPGRADE, HeaderValue::from_static("h2c"));
        assert!(strip_unknown(&mut r));
        assert!(r.headers().get(UPGRADE).is_none());
    }
}
