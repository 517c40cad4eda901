//! The deployment files checked against the code they deploy: the Kubernetes manifests
//! (probes, resources, disruption budgets, autoscalers for every service), the RabbitMQ
//! definitions (the very queues and arguments `conduit_core::topology` declares, since a
//! queue declared with different arguments makes every service fail at start-up) and the
//! compose file. These files are read by tools the unit tests never run, so a renamed
//! queue or port would otherwise only show in a cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use conduit_core::{
    config::AmqpSettings,
    topology::{route, Topology, WAIT_BUCKETS},
    Broker, Secret, Service,
};
use serde::Deserialize;
use serde_json::{json, Value as Json};
use serde_yaml::Value as Yaml;
use tokio_util::sync::CancellationToken;

const SERVICES: [Service; 3] = [Service::Api, Service::Generator, Service::WebhookSender];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// The Dockerfile target of a service: `api`, `generator`, `webhook-sender`.
fn docker_target(service: Service) -> &'static str {
    service
        .name()
        .strip_prefix("conduit-")
        .expect("service names start with conduit-")
}

/// The port of the service's default bind, which its probes and Service must use.
fn default_port(service: Service) -> u16 {
    service
        .default_bind()
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .expect("default bind is host:port")
}

// ---------------------------------------------------------------------------------------
// Kubernetes manifests
// ---------------------------------------------------------------------------------------

/// One YAML document of a manifest file.
struct Resource {
    file: String,
    doc: Yaml,
}

impl Resource {
    fn kind(&self) -> &str {
        str_at(&self.doc, &["kind"]).unwrap_or("")
    }

    fn name(&self) -> &str {
        str_at(&self.doc, &["metadata", "name"]).unwrap_or("")
    }
}

struct Manifests(Vec<Resource>);

impl Manifests {
    fn load() -> Self {
        let dir = workspace_root().join("deploy/k8s");
        let mut resources = Vec::new();
        for path in yaml_files(&dir) {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let file = path
                .strip_prefix(&dir)
                .expect("file under deploy/k8s")
                .display()
                .to_string();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let doc = Yaml::deserialize(document)
                    .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
                if doc.is_null() {
                    continue;
                }
                assert!(
                    str_at(&doc, &["apiVersion"]).is_some() && str_at(&doc, &["kind"]).is_some(),
                    "{file}: every document needs apiVersion and kind"
                );
                resources.push(Resource {
                    file: file.clone(),
                    doc,
                });
            }
        }
        assert!(
            !resources.is_empty(),
            "no manifests found in {}",
            dir.display()
        );
        Self(resources)
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Resource> + 'a {
        self.0.iter().filter(move |r| r.kind() == kind)
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Resource> {
        self.0.iter().find(|r| r.kind() == kind && r.name() == name)
    }

    fn deployment(&self, service: Service) -> &Resource {
        self.find("Deployment", service.name())
            .unwrap_or_else(|| panic!("no Deployment named {} in deploy/k8s", service.name()))
    }

    /// `CONDUIT__AMQP__NAMESPACE` as the ConfigMaps set it (the queue-name prefix).
    fn amqp_namespace(&self) -> String {
        self.of_kind("ConfigMap")
            .find_map(|cm| str_at(&cm.doc, &["data", "CONDUIT__AMQP__NAMESPACE"]))
            .unwrap_or("conduit")
            .to_owned()
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn at<'a>(value: &'a Yaml, path: &[&str]) -> Option<&'a Yaml> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn str_at<'a>(value: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Yaml::as_str)
}

fn seq_at<'a>(value: &'a Yaml, path: &[&str]) -> &'a [Yaml] {
    at(value, path)
        .and_then(Yaml::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Labels as a map, for selector matching.
fn labels(value: Option<&Yaml>) -> BTreeMap<String, String> {
    value
        .and_then(Yaml::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// True when every label of `selector` is on the pods.
fn selects(selector: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

fn pod_labels(deployment: &Resource) -> BTreeMap<String, String> {
    labels(at(
        &deployment.doc,
        &["spec", "template", "metadata", "labels"],
    ))
}

fn main_container(deployment: &Resource) -> &Yaml {
    seq_at(&deployment.doc, &["spec", "template", "spec", "containers"])
        .first()
        .unwrap_or_else(|| {
            panic!(
                "Deployment {} ({}) has no container",
                deployment.name(),
                deployment.file
            )
        })
}

/// A probe's or Service's port, resolving a port name against the container's ports.
fn resolve_port(container: &Yaml, port: &Yaml) -> Option<u64> {
    if let Some(number) = port.as_u64() {
        return Some(number);
    }
    let name = port.as_str()?;
    seq_at(container, &["ports"])
        .iter()
        .find(|p| str_at(p, &["name"]) == Some(name))
        .and_then(|p| at(p, &["containerPort"]))
        .and_then(Yaml::as_u64)
}

fn env_value<'a>(container: &'a Yaml, name: &str) -> Option<&'a str> {
    seq_at(container, &["env"])
        .iter()
        .find(|e| str_at(e, &["name"]) == Some(name))
        .and_then(|e| str_at(e, &["value"]))
}

/// A value set on the container or in a ConfigMap it loads with `envFrom`.
fn effective_env(manifests: &Manifests, container: &Yaml, name: &str) -> Option<String> {
    if let Some(v) = env_value(container, name) {
        return Some(v.to_owned());
    }
    seq_at(container, &["envFrom"]).iter().find_map(|source| {
        let cm = str_at(source, &["configMapRef", "name"])?;
        let cm = manifests.find("ConfigMap", cm)?;
        str_at(&cm.doc, &["data", name]).map(str::to_owned)
    })
}

/// Kubernetes CPU quantity in millicores (`100m`, `1`, `1.5`).
fn cpu_millis(raw: &Yaml) -> f64 {
    let text = quantity_text(raw);
    match text.strip_suffix('m') {
        Some(m) => m.parse().expect("CPU millicores"),
        None => text.parse::<f64>().expect("CPU cores") * 1000.0,
    }
}

/// Kubernetes memory quantity in bytes (`64Mi`, `1Gi`, `128M`, plain bytes).
fn memory_bytes(raw: &Yaml) -> f64 {
    let text = quantity_text(raw);
    let units: [(&str, f64); 6] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
    ];
    for (suffix, factor) in units {
        if let Some(n) = text.strip_suffix(suffix) {
            return n.parse::<f64>().expect("memory quantity") * factor;
        }
    }
    text.parse().expect("memory in bytes")
}

fn quantity_text(raw: &Yaml) -> String {
    match raw {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        other => panic!("not a quantity: {other:?}"),
    }
}

#[test]
fn every_service_deployment_probes_health_and_readiness_on_its_port() {
    let manifests = Manifests::load();
    for service in SERVICES {
        let deployment = manifests.deployment(service);
        let name = service.name();
        let container = main_container(deployment);
        let port = u64::from(default_port(service));

        assert!(
            seq_at(container, &["ports"])
                .iter()
                .any(|p| at(p, &["containerPort"]).and_then(Yaml::as_u64) == Some(port)),
            "{name}: the container must expose port {port}"
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = at(container, &[probe, "httpGet"])
                .unwrap_or_else(|| panic!("{name}: no {probe} with httpGet"));
            assert_eq!(
                str_at(get, &["path"]),
                Some(path),
                "{name}: {probe} must call {path}"
            );
            let probe_port = at(get, &["port"]).and_then(|p| resolve_port(container, p));
            assert_eq!(
                probe_port,
                Some(port),
                "{name}: {probe} must use port {port}"
            );
        }
        let bind = env_value(container, "CONDUIT__HTTP__BIND")
            .unwrap_or_else(|| panic!("{name}: CONDUIT__HTTP__BIND is not set"));
        assert!(
            bind.ends_with(&format!(":{port}")),
            "{name}: CONDUIT__HTTP__BIND {bind} does not listen on the probed port {port}"
        );
        assert_eq!(
            effective_env(&manifests, container, "CONDUIT__LOG__FORMAT").as_deref(),
            Some("json"),
            "{name}: logs in a cluster are JSON"
        );
        let image = str_at(container, &["image"]).unwrap_or_default();
        let repository = image.rsplit_once(':').map_or(image, |(repo, _)| repo);
        assert!(
            repository.ends_with(&format!("/{name}")),
            "{name}: image {image} should be the {} target of deploy/Dockerfile",
            docker_target(service)
        );
    }
}

#[test]
fn every_service_deployment_has_resources_and_time_to_drain() {
    let manifests = Manifests::load();
    let mut cpu_requests = BTreeMap::new();
    let mut memory_limits = BTreeMap::new();
    for service in SERVICES {
        let deployment = manifests.deployment(service);
        let name = service.name();
        let container = main_container(deployment);
        for resource in ["cpu", "memory"] {
            let request = at(container, &["resources", "requests", resource])
                .unwrap_or_else(|| panic!("{name}: no {resource} request"));
            let limit = at(container, &["resources", "limits", resource])
                .unwrap_or_else(|| panic!("{name}: no {resource} limit"));
            let (request, limit) = if resource == "cpu" {
                (cpu_millis(request), cpu_millis(limit))
            } else {
                (memory_bytes(request), memory_bytes(limit))
            };
            assert!(
                request > 0.0 && request <= limit,
                "{name}: {resource} request must be positive and within the limit"
            );
            if resource == "cpu" {
                cpu_requests.insert(name, request);
            } else {
                memory_limits.insert(name, limit);
            }
        }
        // Services exit within 30 s of SIGTERM; the grace period must not cut that short.
        let grace = at(
            &deployment.doc,
            &["spec", "template", "spec", "terminationGracePeriodSeconds"],
        )
        .and_then(Yaml::as_u64)
        .unwrap_or(30);
        assert!(
            grace >= 40,
            "{name}: terminationGracePeriodSeconds {grace} leaves no room for the 30 s drain"
        );
    }
    // The generator renders video; it must get more than the two I/O-bound services.
    let generator = Service::Generator.name();
    for other in [Service::Api.name(), Service::WebhookSender.name()] {
        assert!(cpu_requests[generator] > cpu_requests[other]);
        assert!(memory_limits[generator] > memory_limits[other]);
    }
}

#[test]
fn every_service_deployment_has_a_disruption_budget_and_an_autoscaler() {
    let manifests = Manifests::load();
    let namespace = manifests.amqp_namespace();
    let topology = Topology::new(namespace);
    for service in SERVICES {
        let deployment = manifests.deployment(service);
        let name = service.name();
        let pods = pod_labels(deployment);
        let selector = labels(at(&deployment.doc, &["spec", "selector", "matchLabels"]));
        assert!(
            selects(&selector, &pods),
            "{name}: the Deployment's selector must match its pod labels"
        );

        let pdbs: Vec<_> = manifests
            .of_kind("PodDisruptionBudget")
            .filter(|pdb| {
                selects(
                    &labels(at(&pdb.doc, &["spec", "selector", "matchLabels"])),
                    &pods,
                )
            })
            .collect();
        assert_eq!(
            pdbs.len(),
            1,
            "{name}: exactly one PodDisruptionBudget must select its pods"
        );
        let pdb = &pdbs[0].doc;
        assert!(
            at(pdb, &["spec", "minAvailable"]).is_some()
                || at(pdb, &["spec", "maxUnavailable"]).is_some(),
            "{name}: the PodDisruptionBudget sets no budget"
        );

        let targets = |r: &&Resource| {
            str_at(&r.doc, &["spec", "scaleTargetRef", "name"]) == Some(name)
                && str_at(&r.doc, &["spec", "scaleTargetRef", "kind"]).unwrap_or("Deployment")
                    == "Deployment"
        };
        let hpas: Vec<_> = manifests
            .of_kind("HorizontalPodAutoscaler")
            .filter(targets)
            .collect();
        let scaled: Vec<_> = manifests.of_kind("ScaledObject").filter(targets).collect();
        assert_eq!(
            hpas.len() + scaled.len(),
            1,
            "{name}: exactly one autoscaler (HPA or KEDA ScaledObject) must target it"
        );

        match service {
            Service::Api => {
                let hpa = hpas
                    .first()
                    .unwrap_or_else(|| panic!("{name}: scales with an HPA on CPU"));
                assert!(
                    seq_at(&hpa.doc, &["spec", "metrics"])
                        .iter()
                        .any(|m| str_at(m, &["resource", "name"]) == Some("cpu")),
                    "{name}: the HPA must scale on CPU"
                );
            }
            Service::Generator | Service::WebhookSender => {
                let queue = topology.queue(if service == Service::Generator {
                    route::JOBS
                } else {
                    route::WEBHOOKS
                });
                let scaled = scaled
                    .first()
                    .unwrap_or_else(|| panic!("{name}: scales with a KEDA ScaledObject"));
                let trigger = seq_at(&scaled.doc, &["spec", "triggers"])
                    .iter()
                    .find(|t| str_at(t, &["type"]) == Some("rabbitmq"))
                    .unwrap_or_else(|| panic!("{name}: no rabbitmq trigger"));
                assert_eq!(
                    str_at(trigger, &["metadata", "queueName"]),
                    Some(queue.as_str()),
                    "{name}: must scale on the depth of {queue}"
                );
                assert_eq!(str_at(trigger, &["metadata", "mode"]), Some("QueueLength"));
                let auth = str_at(trigger, &["authenticationRef", "name"])
                    .unwrap_or_else(|| panic!("{name}: the trigger has no authenticationRef"));
                assert!(
                    manifests.find("TriggerAuthentication", auth).is_some(),
                    "{name}: TriggerAuthentication {auth} is not in deploy/k8s"
                );
            }
        }
    }
}

#[test]
fn services_and_references_point_at_resources_that_exist() {
    let manifests = Manifests::load();
    for svc in manifests.of_kind("Service") {
        let selector = labels(at(&svc.doc, &["spec", "selector"]));
        let deployment = manifests
            .of_kind("Deployment")
            .find(|d| selects(&selector, &pod_labels(d)))
            .unwrap_or_else(|| {
                panic!(
                    "Service {} ({}) selects no Deployment",
                    svc.name(),
                    svc.file
                )
            });
        let container = main_container(deployment);
        for port in seq_at(&svc.doc, &["spec", "ports"]) {
            let target = at(port, &["targetPort"]).or_else(|| at(port, &["port"]));
            assert!(
                target.and_then(|t| resolve_port(container, t)).is_some(),
                "Service {}: targetPort {target:?} is not a port of {}",
                svc.name(),
                deployment.name()
            );
        }
    }

    let exists = |kind: &str, name: &str, by: &str| {
        assert!(
            manifests.find(kind, name).is_some(),
            "{by} refers to {kind} {name}, which is not in deploy/k8s"
        );
    };
    for deployment in manifests.of_kind("Deployment") {
        let by = format!("Deployment {}", deployment.name());
        for container in seq_at(&deployment.doc, &["spec", "template", "spec", "containers"]) {
            for source in seq_at(container, &["envFrom"]) {
                if let Some(cm) = str_at(source, &["configMapRef", "name"]) {
                    exists("ConfigMap", cm, &by);
                }
                if let Some(secret) = str_at(source, &["secretRef", "name"]) {
                    exists("Secret", secret, &by);
                }
            }
            for var in seq_at(container, &["env"]) {
                if let Some(secret) = str_at(var, &["valueFrom", "secretKeyRef", "name"]) {
                    exists("Secret", secret, &by);
                }
            }
        }
        if let Some(sa) = str_at(
            &deployment.doc,
            &["spec", "template", "spec", "serviceAccountName"],
        ) {
            exists("ServiceAccount", sa, &by);
        }
    }
    for auth in manifests.of_kind("TriggerAuthentication") {
        for target in seq_at(&auth.doc, &["spec", "secretTargetRef"]) {
            let secret = str_at(target, &["name"]).unwrap_or_default();
            exists(
                "Secret",
                secret,
                &format!("TriggerAuthentication {}", auth.name()),
            );
        }
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let dir = workspace_root().join("deploy/k8s");
    let text = std::fs::read_to_string(dir.join("kustomization.yaml"))
        .expect("deploy/k8s/kustomization.yaml exists");
    let kustomization: Yaml = serde_yaml::from_str(&text).expect("kustomization.yaml parses");
    let listed: BTreeSet<String> = seq_at(&kustomization, &["resources"])
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let on_disk: BTreeSet<String> = yaml_files(&dir)
        .iter()
        .map(|p| {
            p.strip_prefix(&dir)
                .expect("under deploy/k8s")
                .display()
                .to_string()
        })
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml resources must list exactly the manifest files"
    );
}

#[test]
fn config_maps_hold_no_secrets() {
    let manifests = Manifests::load();
    for cm in manifests.of_kind("ConfigMap") {
        let data = at(&cm.doc, &["data"])
            .and_then(Yaml::as_mapping)
            .cloned()
            .unwrap_or_default();
        for (key, value) in &data {
            let key = key.as_str().unwrap_or_default();
            let value = value.as_str().unwrap_or_default();
            let secret_name = ["API_KEY", "API_TOKEN", "SECRET", "PASSWORD", "SIGNING_KEY"]
                .iter()
                .any(|s| key.to_ascii_uppercase().contains(s));
            // A URL with user-info carries a password (amqp://user:pass@host).
            let credentials_in_url = value.contains("://") && value.contains('@');
            assert!(
                !secret_name && !credentials_in_url,
                "ConfigMap {} ({}) holds {key}, which belongs in a Secret",
                cm.name(),
                cm.file
            );
        }
    }
}

/// `kubectl kustomize` builds the kustomization the way `kubectl apply -k` would, which
/// catches what reading the files one by one cannot (a broken images or resources entry).
#[test]
fn kustomization_builds() {
    let dir = workspace_root().join("deploy/k8s");
    let out = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "skipped: kubectl is not installed; the manifests were still checked one by one"
            );
            return;
        }
        Err(e) => panic!("running kubectl kustomize: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/k8s failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = String::from_utf8_lossy(&out.stdout);
    let mut deployments = 0;
    for document in serde_yaml::Deserializer::from_str(&built) {
        let doc = Yaml::deserialize(document).expect("kustomize prints YAML");
        if str_at(&doc, &["kind"]) == Some("Namespace") {
            continue;
        }
        assert_eq!(
            str_at(&doc, &["metadata", "namespace"]),
            Some("conduit"),
            "{:?} is not placed in the conduit namespace",
            str_at(&doc, &["metadata", "name"])
        );
        if str_at(&doc, &["kind"]) == Some("Deployment") {
            deployments += 1;
        }
    }
    assert_eq!(deployments, SERVICES.len(), "one Deployment per service");
}

// ---------------------------------------------------------------------------------------
// RabbitMQ definitions
// ---------------------------------------------------------------------------------------

fn definitions() -> Json {
    let path = workspace_root().join("deploy/rabbitmq/definitions.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("definitions.json is valid JSON")
}

/// Queue name → arguments, exactly as `Topology::declare` declares them.
fn expected_queues(topology: &Topology) -> BTreeMap<String, Json> {
    let mut queues = BTreeMap::new();
    for r in route::QUORUM_QUEUES {
        queues.insert(topology.queue(r), json!({"x-queue-type": "quorum"}));
    }
    queues.insert(
        topology.queue(route::LIFECYCLE),
        json!({
            "x-queue-type": "stream",
            "x-max-age": format!("{}s", conduit_core::topology::LIFECYCLE_RETENTION.as_secs()),
        }),
    );
    for delay in WAIT_BUCKETS {
        queues.insert(
            topology.queue(&Topology::wait_route(delay)),
            json!({
                "x-message-ttl": u64::try_from(delay.as_millis()).expect("TTL fits"),
                "x-dead-letter-exchange": topology.exchange(),
                "x-dead-letter-routing-key": route::WEBHOOKS,
            }),
        );
    }
    queues
}

fn array<'a>(defs: &'a Json, key: &str) -> &'a [Json] {
    defs.get(key)
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("definitions.json has no {key} array"))
}

#[test]
fn rabbitmq_definitions_declare_the_topology_of_the_code() {
    let defs = definitions();
    let topology = Topology::new("conduit");
    let expected = expected_queues(&topology);

    let mut actual = BTreeMap::new();
    for q in array(&defs, "queues") {
        let name = q["name"].as_str().expect("queue name").to_owned();
        assert_eq!(q["vhost"], "/", "{name}: vhost");
        assert_eq!(q["durable"], true, "{name}: must be durable");
        assert_eq!(q["auto_delete"], false, "{name}: must not be auto-deleted");
        assert!(
            actual
                .insert(name.clone(), q["arguments"].clone())
                .is_none(),
            "{name} is defined twice"
        );
    }
    assert_eq!(
        actual, expected,
        "queues and their arguments must match conduit_core::topology exactly"
    );

    let exchanges: BTreeMap<String, (String, bool)> = array(&defs, "exchanges")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("exchange name").to_owned(),
                (
                    e["type"].as_str().expect("exchange type").to_owned(),
                    e["durable"] == true,
                ),
            )
        })
        .collect();
    let expected_exchanges = BTreeMap::from([
        (topology.exchange(), ("direct".to_owned(), true)),
        (topology.control_exchange(), ("fanout".to_owned(), true)),
        (topology.stream_exchange(), ("fanout".to_owned(), true)),
    ]);
    assert_eq!(exchanges, expected_exchanges);

    // Each queue hangs off the direct exchange under its short name; the fanout feeds
    // the lifecycle stream.
    let bindings: BTreeSet<(String, String, String, String)> = array(&defs, "bindings")
        .iter()
        .map(|b| {
            let field = |k: &str| b[k].as_str().unwrap_or_default().to_owned();
            (
                field("source"),
                field("destination"),
                field("destination_type"),
                field("routing_key"),
            )
        })
        .collect();
    let prefix = format!("{}.", topology.namespace());
    let mut expected_bindings: BTreeSet<_> = expected
        .keys()
        .map(|queue| {
            let short = queue
                .strip_prefix(&prefix)
                .expect("queue under the namespace");
            (
                topology.exchange(),
                queue.clone(),
                "queue".to_owned(),
                short.to_owned(),
            )
        })
        .collect();
    expected_bindings.insert((
        topology.control_exchange(),
        topology.queue(route::LIFECYCLE),
        "queue".to_owned(),
        String::new(),
    ));
    assert_eq!(bindings, expected_bindings);
}

/// `definitions.json` moved to another namespace, trimmed to what one stack owns.
fn definitions_for(namespace: &str) -> Json {
    let rename = |name: &str| -> String {
        match name.strip_prefix("conduit") {
            Some("") => namespace.to_owned(),
            Some(rest) if rest.starts_with('.') => format!("{namespace}{rest}"),
            _ => name.to_owned(),
        }
    };
    let mut defs = definitions();
    for (key, fields) in [
        ("exchanges", &["name"][..]),
        ("queues", &["name"][..]),
        ("bindings", &["source", "destination"][..]),
    ] {
        for item in defs[key].as_array_mut().expect("array") {
            for field in fields {
                let renamed = rename(item[*field].as_str().expect("name"));
                item[*field] = json!(renamed);
            }
            if let Some(dlx) = item["arguments"].get("x-dead-letter-exchange").cloned() {
                item["arguments"]["x-dead-letter-exchange"] =
                    json!(rename(dlx.as_str().expect("exchange name")));
            }
        }
    }
    json!({
        "exchanges": defs["exchanges"],
        "queues": defs["queues"],
        "bindings": defs["bindings"],
    })
}

fn rabbitmqctl(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("rabbitmqctl").args(args).output()
}

/// Imports definitions with `rabbitmqctl` and waits until its queues exist (the import
/// finishes asynchronously).
async fn import_definitions(defs: &Json, namespace: &str) {
    let file = std::env::temp_dir().join(format!("conduit-definitions-{namespace}.json"));
    std::fs::write(&file, serde_json::to_vec(defs).expect("serialise")).expect("write temp file");
    let out = rabbitmqctl(&["import_definitions", &file.display().to_string()])
        .expect("running rabbitmqctl");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "rabbitmqctl import_definitions failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wanted = queue_names(defs);
    for _ in 0..300 {
        if wanted.is_subset(&broker_queues(namespace)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the imported queues of {namespace} never appeared");
}

fn queue_names(defs: &Json) -> BTreeSet<String> {
    array(defs, "queues")
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_owned))
        .collect()
}

/// Queues on the local broker whose name starts with `namespace.`.
fn broker_queues(namespace: &str) -> BTreeSet<String> {
    let out = rabbitmqctl(&["list_queues", "--quiet", "--no-table-headers", "name"])
        .expect("running rabbitmqctl");
    let prefix = format!("{namespace}.");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Starts a broker handle for `namespace` (which declares the whole topology) and says
/// whether it became ready within `within`.
async fn services_can_declare(amqp_url: &str, namespace: &str, within: Duration) -> bool {
    let shutdown = CancellationToken::new();
    let settings = AmqpSettings {
        url: Secret::new(amqp_url),
        namespace: namespace.to_owned(),
        prefetch: 1,
        ca_file: None,
    };
    let broker = Broker::start(&settings, "deploy-test", shutdown.clone());
    let ready = broker.wait_ready(within).await.is_ok();
    shutdown.cancel();
    ready
}

/// The definitions are imported into a fresh namespace of the machine's RabbitMQ, then a
/// service's broker handle declares its topology over them: with any argument differing
/// the broker refuses the declaration and the service would never become ready. A copy
/// with one TTL changed proves the check can fail.
#[tokio::test]
async fn rabbitmq_definitions_import_and_services_declare_over_them() {
    let host = std::env::var("CONDUIT_TEST_AMQP_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    if host != "127.0.0.1" || rabbitmqctl(&["version"]).is_err() {
        eprintln!(
            "skipped: needs rabbitmqctl for the RabbitMQ on 127.0.0.1; \
             the static comparison with the topology still ran"
        );
        return;
    }
    let amqp_url = conduit_core::testing::AMQP_URL;
    let good = conduit_core::testing::unique_namespace();
    let bad = conduit_core::testing::unique_namespace();

    let good_defs = definitions_for(&good);
    import_definitions(&good_defs, &good).await;
    let good_ready = services_can_declare(amqp_url, &good, Duration::from_secs(30)).await;
    let declared = broker_queues(&good);

    let mut bad_defs = definitions_for(&bad);
    let wait_5s = format!("{bad}.{}", Topology::wait_route(Duration::from_secs(5)));
    for q in bad_defs["queues"].as_array_mut().expect("queues") {
        if q["name"] == wait_5s.as_str() {
            q["arguments"]["x-message-ttl"] = json!(5001);
        }
    }
    import_definitions(&bad_defs, &bad).await;
    let bad_ready = services_can_declare(amqp_url, &bad, Duration::from_secs(5)).await;

    for ns in [&good, &bad] {
        let _ = conduit_core::testing::delete_namespace(amqp_url, ns).await;
    }
    assert!(
        good_ready,
        "a service could not declare its topology over the imported definitions: \
         an argument in deploy/rabbitmq/definitions.json differs from conduit_core::topology"
    );
    assert_eq!(
        declared,
        queue_names(&good_defs),
        "the services declare queues that definitions.json does not have"
    );
    assert!(
        !bad_ready,
        "a queue with a different TTL was accepted; the import check proves nothing"
    );
}

// ---------------------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------------------

#[test]
fn compose_file_parses_and_builds_each_service_from_its_dockerfile_target() {
    let root = workspace_root();
    let out = match Command::new("docker-compose")
        .arg("--file")
        .arg(root.join("docker-compose.yml"))
        .arg("config")
        .current_dir(&root)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "docker-compose is not installed; scripts/test installs it (Debian package \
             docker-compose), or install it yourself and run again"
        ),
        Err(e) => panic!("running docker-compose: {e}"),
    };
    assert!(
        out.status.success(),
        "docker-compose config refused docker-compose.yml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Yaml =
        serde_yaml::from_slice(&out.stdout).expect("docker-compose config prints YAML");
    let dockerfile =
        std::fs::read_to_string(root.join("deploy/Dockerfile")).expect("deploy/Dockerfile exists");

    for dependency in ["rabbitmq", "postgres"] {
        assert!(
            at(&config, &["services", dependency]).is_some(),
            "the compose stack needs {dependency}"
        );
    }
    for service in SERVICES {
        let target = docker_target(service);
        let compose = at(&config, &["services", target])
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {target}"));
        assert_eq!(str_at(compose, &["build", "target"]), Some(target));
        assert!(
            dockerfile
                .lines()
                .any(|l| l.trim().ends_with(&format!(" AS {target}"))),
            "deploy/Dockerfile has no target {target}"
        );
        let bind = str_at(compose, &["environment", "CONDUIT__HTTP__BIND"]).unwrap_or_default();
        assert!(
            bind.ends_with(&format!(":{}", default_port(service))),
            "{target}: compose binds {bind:?}, not its default port"
        );
    }
}
