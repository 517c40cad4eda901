//! deploy/observability: the Prometheus alert rules pass `promtool check rules`, the
//! Grafana dashboard is valid JSON with a query in every panel, and every metric either
//! refers to is one the services serve (docs/operations.md's table, which
//! tests/observability.rs checks against the running services) or one of RabbitMQ's.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// RabbitMQ's own metrics (the `rabbitmq_prometheus` plugin) that operations.md names.
const RABBITMQ: [&str; 4] = [
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_consumers",
];

/// Metric names in docs/operations.md's table of what the services serve.
fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(root().join("docs/operations.md")).expect("operations.md");
    doc.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells.len() > 3 && ["API", "generator", "sender", "all"].contains(&cells[1]))
                .then(|| cells[2].trim_matches('`').to_owned())
        })
        .filter(|n| n.starts_with("conduit_") || n.starts_with("process_"))
        .collect()
}

/// The metric names a PromQL expression refers to: identifiers of the known prefixes
/// that are not followed by `(`, with histogram suffixes removed.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_string = false;
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            in_string = !in_string;
            i += 1;
            continue;
        }
        if in_string {
            if c == '\\' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if ["conduit_", "process_", "rabbitmq_"]
                .iter()
                .any(|p| word.starts_with(p))
            {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s).filter(|b| !b.ends_with("_total")))
                    .unwrap_or(&word)
                    .to_owned();
                names.insert(base);
            }
            continue;
        }
        i += 1;
    }
    names
}

fn check_known(exprs: &[String], what: &str) {
    let documented = documented();
    assert!(
        documented.len() > 20,
        "metric table not found in operations.md"
    );
    let mut seen = BTreeSet::new();
    for expr in exprs {
        for name in metrics_in(expr) {
            assert!(
                documented.contains(&name) || RABBITMQ.contains(&name.as_str()),
                "{what} refers to {name}, which no service serves (expression: {expr})"
            );
            seen.insert(name);
        }
    }
    assert!(
        seen.len() >= 5,
        "{what} refers to too few metrics: {seen:?}"
    );
}

#[test]
fn alert_rules_pass_promtool_and_use_served_metrics() {
    let rules = root().join("deploy/observability/alerts.yml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .expect("promtool runs (scripts/test installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&rules).expect("rules")).expect("YAML");
    let mut exprs = Vec::new();
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            exprs.push(rule["expr"].as_str().expect("expr").to_owned());
            alerts.insert(rule["alert"].as_str().expect("alert name").to_owned());
        }
    }
    for wanted in [
        "ConduitConsumersMissing",
        "ConduitWebhookDeadLetters",
        "ConduitWebhookFailureRatio",
        "ConduitOutboxLag",
        "ConduitProviderErrorBurst",
    ] {
        assert!(
            alerts.contains(wanted),
            "alert {wanted} missing: {alerts:?}"
        );
    }
    check_known(&exprs, "an alert rule");
}

#[test]
fn dashboard_is_valid_json_and_uses_served_metrics() {
    let path = root().join("deploy/observability/conduit-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
            .expect("dashboard is JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    let all: String = exprs.join("\n");
    for signal in [
        "conduit_api_tasks_submitted_total",
        "rabbitmq_queue_messages_ready",
        "conduit_generator_generation_seconds_bucket",
        "conduit_webhook_attempts_total",
        "conduit_webhook_attempt_duration_seconds_bucket",
        "conduit_webhook_parked_total",
        "process_resident_memory_bytes",
    ] {
        assert!(all.contains(signal), "the dashboard shows no {signal}");
    }
    check_known(&exprs, "the dashboard");
}

#[test]
fn metric_names_are_read_from_expressions() {
    let names = metrics_in(
        r#"histogram_quantile(0.5, sum by (le) (rate(conduit_webhook_attempt_duration_seconds_bucket{job=~"a|conduit_x"}[5m]))) / process_open_fds"#,
    );
    let want: BTreeSet<String> = [
        "conduit_webhook_attempt_duration_seconds",
        "process_open_fds",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(names, want);
}
