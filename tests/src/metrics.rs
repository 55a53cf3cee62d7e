//! Reading the admin `/metrics` page: find samples by metric name and a subset of labels.
//!
//! ```ignore
//! let text = metrics::scrape(proxy.admin()).await;
//! let n = metrics::metric_value(&text, "agent_requests_total", &[("target", "b"), ("status", "503")]);
//! ```

use crate::client;
use std::net::SocketAddr;

/// One sample line of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// GETs `/metrics` from an admin listener; panics unless it answers 200.
pub async fn scrape(admin: SocketAddr) -> String {
    let reply = client::http1(admin).get("admin", "/metrics").await;
    assert_eq!(
        reply.status,
        200,
        "GET /metrics on {admin}: {}",
        reply.text()
    );
    reply.text()
}

/// The sum of every sample named `name` whose labels include all of `labels`; `None` when no
/// sample matches (a counter that was never incremented is often absent).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for sample in samples(text) {
        if sample.name != name {
            continue;
        }
        let all = labels
            .iter()
            .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if all {
            *found.get_or_insert(0.0) += sample.value;
        }
    }
    found
}

/// Like [`metric_value`], but an absent metric counts as zero.
pub fn metric_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(text, name, labels).unwrap_or(0.0)
}

/// Scrapes `admin` until the sample sum for `name` and `labels` reaches `at_least`; returns it.
/// Counters may be bumped just after the event a test caused, so one scrape could race it.
pub async fn wait_for_metric(
    admin: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
) -> f64 {
    let what = format!("{name}{labels:?} to reach {at_least} on {admin}");
    crate::eventually(&what, || async {
        let text = scrape(admin).await;
        metric_value(&text, name, labels).filter(|v| *v >= at_least)
    })
    .await
}

/// Every sample in a Prometheus text page; comments and malformed lines are skipped.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let (labels, rest) = parse_labels(&line[i + 1..])?;
            (&line[..i], labels, rest)
        }
        Some(i) => (&line[..i], Vec::new(), &line[i..]),
        None => return None,
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP agent_requests_total Requests.
# TYPE agent_requests_total counter
agent_requests_total{agent="a",target="b",phase="critical",status="200"} 3
agent_requests_total{agent="a",target="b",phase="critical",status="503"} 2
agent_requests_total{agent="a",target="c,\"x\"",phase="critical",status="503"} 1
agent_protocol_errors_total{kind="unknown_protocol"} 4
up 1
"#;

    #[test]
    fn finds_samples_by_label_subset() {
        let v = metric_value(
            PAGE,
            "agent_requests_total",
            &[("target", "b"), ("status", "503")],
        );
        assert_eq!(v, Some(2.0));
        // A subset matching several samples sums them.
        assert_eq!(
            metric_value(PAGE, "agent_requests_total", &[("target", "b")]),
            Some(5.0)
        );
        assert_eq!(
            metric_value(PAGE, "agent_requests_total", &[("target", "c,\"x\"")]),
            Some(1.0)
        );
        assert_eq!(
            metric_value(
                PAGE,
                "agent_protocol_errors_total",
                &[("kind", "unknown_protocol")]
            ),
            Some(4.0)
        );
        assert_eq!(metric_value(PAGE, "up", &[]), Some(1.0));
        assert_eq!(
            metric_value(PAGE, "agent_requests_total", &[("target", "z")]),
            None
        );
    }
}
