//! Structural checks of `deploy/`, with real tools: every YAML file parses; every Kanaria
//! config in it (the Kubernetes ConfigMap's, compose's, systemd's) passes the real
//! `kanaria check`; the Kubernetes manifests fit together (probes on the admin endpoints,
//! grace periods, selectors, the config mounted as a directory); the compose file,
//! Dockerfile and systemd unit do what deploy/README.md says; Prometheus' own `promtool`
//! checks and unit-tests the alert rules; and the Grafana dashboard and the rules query only
//! metrics that a running Kanaria exports. (Docker and a cluster are not available to the
//! tests: the container files are checked for structure only.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;
mod tools;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{kanaria_bin, pool, Proxy, Upstream};
use serde::Deserialize;
use serde_yaml::Value as Yaml;
use tools::{deploy_dir, tool};

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy_dir().join(rel))
        .unwrap_or_else(|e| panic!("reading deploy/{rel}: {e}"))
}

/// Every file below `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read deploy dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// All documents of a (multi-document) YAML text.
fn yaml_docs(text: &str, what: &str) -> Vec<Yaml> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|d| !d.is_null())
        .collect()
}

fn yaml(rel: &str) -> Yaml {
    let mut docs = yaml_docs(&read(rel), rel);
    assert_eq!(docs.len(), 1, "deploy/{rel} holds one document");
    docs.remove(0)
}

/// Every object of the Kubernetes manifests.
fn k8s() -> Vec<Yaml> {
    let mut paths = Vec::new();
    files(&deploy_dir().join("kubernetes"), &mut paths);
    paths.sort();
    paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).expect("read manifest");
            yaml_docs(&text, &p.display().to_string())
        })
        .collect()
}

fn object<'a>(objects: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn s(v: &Yaml) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// Does `selector` (a label map) select an object with `labels`?
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let sel = selector.as_mapping().expect("selector is a map");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn toml_table(text: &str, what: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_else(|e| panic!("{what} is not TOML: {e}"))
}

fn duration(t: &toml::Table, section: &str, key: &str, default: &str) -> Duration {
    let v = t
        .get(section)
        .and_then(|s| s.get(key))
        .and_then(|v| v.as_str())
        .unwrap_or(default);
    humantime::parse_duration(v).expect("duration")
}

fn listen_port(t: &toml::Table, section: &str) -> u16 {
    let v = t[section]["listen"]
        .as_str()
        .expect("listen is one address");
    v.parse::<SocketAddr>().expect("listen address").port()
}

/// The `HOST:PORT` endpoints of every pool whose host is a name, not an IP.
fn named_endpoints(t: &toml::Table) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for route in t["routes"].as_array().expect("routes") {
        for pool in ["stable", "canary"] {
            let Some(eps) = route.get(pool).and_then(|p| p.get("endpoints")) else {
                continue;
            };
            for ep in eps.as_array().expect("endpoints") {
                let ep = ep.as_str().expect("endpoint");
                if ep.parse::<SocketAddr>().is_err() {
                    let (host, port) = ep.rsplit_once(':').expect("HOST:PORT");
                    out.push((host.to_string(), port.parse().expect("port")));
                }
            }
        }
    }
    out
}

/// Runs the real `kanaria check` on `text` as written: its endpoint host names resolve only
/// inside compose or the cluster, and `check` resolves none (it works offline).
fn kanaria_check(text: &str, token: Option<&str>) -> (bool, String) {
    let mut local = text.to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    // Certificates exist only where Kanaria is deployed: pairs of a test CA stand in for
    // them, written to the temporary directory and named on the same lines.
    let cfg = toml_table(text, "config");
    let certs = cfg
        .get("proxy")
        .and_then(|p| p.get("tls"))
        .and_then(|t| t.get("certificates"))
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    if !certs.is_empty() {
        let ca = common::certs::TestCa::new("deploy test CA");
        for (i, c) in certs.iter().enumerate() {
            let (cert, key) = common::certs::write_pair(
                dir.path(),
                &format!("cert{i}"),
                &ca.leaf(&["app.example.com"]),
            );
            for (k, written) in [("cert", cert), ("key", key)] {
                let named = c.get(k).and_then(|v| v.as_str()).expect("cert and key");
                local = local.replace(
                    &format!("\"{named}\""),
                    &format!("\"{}\"", written.display()),
                );
            }
        }
    }
    let path = dir.path().join("kanaria.toml");
    std::fs::write(&path, local).expect("write config");
    let mut cmd = Command::new(kanaria_bin());
    cmd.arg("check")
        .arg(&path)
        .env_remove("KANARIA_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("KANARIA_ADMIN_TOKEN", t);
    }
    let out = cmd.output().expect("run kanaria check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn configmap_config(objects: &[Yaml]) -> String {
    s(&object(objects, "ConfigMap", "kanaria-config")["data"]["kanaria.toml"]).to_string()
}

#[test]
fn every_yaml_file_parses_and_every_manifest_is_applied() {
    let mut paths = Vec::new();
    files(&deploy_dir(), &mut paths);
    let rel: BTreeSet<String> = paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| {
            p.strip_prefix(deploy_dir())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for expected in [
        "docker-compose.yml",
        "compose/prometheus/prometheus.yml",
        "kubernetes/kustomization.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/service.yaml",
        "kubernetes/pdb.yaml",
        "kubernetes/servicemonitor.yaml",
        "prometheus/rules.yml",
        "prometheus/rules_test.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/kanaria.yml",
    ] {
        assert!(rel.contains(expected), "deploy/{expected} is missing");
    }
    for r in &rel {
        let docs = yaml_docs(&read(r), r);
        assert!(!docs.is_empty(), "deploy/{r} is empty");
        for d in &docs {
            assert!(d.is_mapping(), "deploy/{r}: a document is not a map");
        }
    }

    // Every Kubernetes object names its API and kind; kustomization.yaml applies every
    // manifest file, so `kubectl apply -k` deploys all of them.
    let objects = k8s();
    for o in &objects {
        assert!(
            o["apiVersion"].is_string() && o["kind"].is_string(),
            "{o:?}"
        );
    }
    let kustomization = yaml("kubernetes/kustomization.yaml");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| s(r).to_string())
        .collect();
    let manifests: BTreeSet<String> = rel
        .iter()
        .filter_map(|r| r.strip_prefix("kubernetes/"))
        .filter(|r| *r != "kustomization.yaml")
        // Manifests that need extra CRDs (cert-manager) are applied by hand.
        .filter(|r| !r.starts_with("optional/"))
        .map(str::to_string)
        .collect();
    assert_eq!(listed, manifests, "kustomization resources vs files");
    for kind in [
        "Deployment",
        "ConfigMap",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
    ] {
        assert!(
            objects.iter().any(|o| o["kind"] == kind),
            "no {kind} in deploy/kubernetes"
        );
    }

    // The Grafana dashboard is JSON with unique panel ids, and every query uses the
    // dashboard's data source variable.
    let dash: serde_json::Value =
        serde_json::from_str(&read("grafana/kanaria.json")).expect("dashboard JSON");
    assert_eq!(dash["uid"], "kanaria");
    let panels = dash["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
        }
        let x = p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap();
        assert!(x <= 24, "panel {} is wider than the grid", p["title"]);
    }
}

#[test]
fn every_kanaria_config_in_deploy_passes_kanaria_check() {
    let objects = k8s();
    let configs = [
        ("kubernetes ConfigMap", configmap_config(&objects), true),
        (
            "compose/kanaria/kanaria.toml",
            read("compose/kanaria/kanaria.toml"),
            true,
        ),
        ("systemd/kanaria.toml", read("systemd/kanaria.toml"), false),
    ];
    for (what, text, needs_token) in &configs {
        let (ok, out) = kanaria_check(text, Some("a-token-from-the-secret"));
        assert!(ok, "{what} fails kanaria check:\n{out}");
        assert!(out.contains(": ok (1 route)"), "{what}: {out}");
        // Container configs put the admin listener on every interface (probes, scraping),
        // which is refused without a token: the token wiring below is what makes them run.
        let (ok, out) = kanaria_check(text, None);
        if *needs_token {
            assert!(!ok, "{what} passes without a token:\n{out}");
            assert!(out.contains("no admin token is set"), "{what}: {out}");
        } else {
            assert!(ok, "{what} needs no token on loopback:\n{out}");
        }
    }

    // The host names the configs send traffic to are the demo apps' Services (with their
    // port) in Kubernetes and the demo app services in compose.
    let cm = toml_table(&configs[0].1, "ConfigMap config");
    let k8s_endpoints = named_endpoints(&cm);
    assert_eq!(k8s_endpoints.len(), 2, "{k8s_endpoints:?}");
    for (host, port) in &k8s_endpoints {
        let svc = object(&objects, "Service", host);
        let ports = svc["spec"]["ports"].as_sequence().expect("ports");
        assert!(
            ports
                .iter()
                .any(|p| p["port"].as_u64() == Some(u64::from(*port))),
            "Service {host} has no port {port}"
        );
    }
    let compose = yaml("docker-compose.yml");
    let compose_cfg = toml_table(&configs[1].1, "compose config");
    let compose_endpoints = named_endpoints(&compose_cfg);
    assert_eq!(compose_endpoints.len(), 2, "{compose_endpoints:?}");
    for (host, port) in &compose_endpoints {
        let svc = &compose["services"][host.as_str()];
        assert!(svc.is_mapping(), "no compose service {host}");
        let cmd: Vec<&str> = svc["command"]
            .as_sequence()
            .expect("command")
            .iter()
            .map(s)
            .collect();
        assert!(
            cmd.contains(&format!("-listen=:{port}").as_str()),
            "compose service {host} does not listen on {port}: {cmd:?}"
        );
    }
}

#[test]
fn kubernetes_probes_grace_mounts_and_selectors_fit_together() {
    let objects = k8s();
    let cfg = toml_table(&configmap_config(&objects), "ConfigMap config");
    let admin_port = listen_port(&cfg, "admin");
    let proxy_port = listen_port(&cfg, "proxy");
    let grace = duration(&cfg, "proxy", "shutdown_grace", "30s");

    let deploy = object(&objects, "Deployment", "kanaria");
    assert!(
        deploy["spec"]["replicas"].as_u64().unwrap() >= 2,
        "replicas"
    );
    let pod = &deploy["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(&deploy["spec"]["selector"]["matchLabels"], labels));
    let containers = pod["spec"]["containers"].as_sequence().expect("containers");
    let c = containers
        .iter()
        .find(|c| c["name"] == "kanaria")
        .expect("container kanaria");
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(args, ["run", "-c", "/etc/kanaria/kanaria.toml"]);

    // Named ports match the config's listeners.
    let ports: BTreeMap<String, u64> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                s(&p["name"]).to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports.get("admin"), Some(&u64::from(admin_port)));
    assert_eq!(ports.get("http"), Some(&u64::from(proxy_port)));
    let port_of = |probe: &Yaml| -> u64 {
        let p = &probe["httpGet"]["port"];
        p.as_u64()
            .or_else(|| p.as_str().and_then(|n| ports.get(n).copied()))
            .expect("probe port")
    };
    // Readiness on /readyz, liveness on /healthz, both on the admin listener.
    let ready = &c["readinessProbe"];
    assert_eq!(ready["httpGet"]["path"], "/readyz");
    assert_eq!(port_of(ready), u64::from(admin_port));
    let live = &c["livenessProbe"];
    assert_eq!(live["httpGet"]["path"], "/healthz");
    assert_eq!(port_of(live), u64::from(admin_port));

    // The admin token comes from a Secret.
    let env = c["env"].as_sequence().expect("env");
    let token = env
        .iter()
        .find(|e| e["name"] == "KANARIA_ADMIN_TOKEN")
        .expect("KANARIA_ADMIN_TOKEN in env");
    assert!(token["valueFrom"]["secretKeyRef"]["name"].is_string());

    // Termination: the kubelet waits for preStop, then SIGTERM; Pingora drains for
    // shutdown_grace and then gives its runtimes 5 s. All of it must fit.
    let pre_stop: Vec<&str> = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .expect("preStop exec")
        .iter()
        .map(s)
        .collect();
    assert_eq!(pre_stop[0], "sleep");
    let sleep: u64 = pre_stop[1].parse().expect("sleep seconds");
    let termination = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination > sleep + grace.as_secs() + 5,
        "terminationGracePeriodSeconds {termination} <= preStop {sleep} + shutdown_grace {grace:?} + 5"
    );

    // The config is a ConfigMap volume mounted as a directory (subPath mounts never get
    // updates); the state dir and the upgrade socket's directory are writable mounts
    // (the root filesystem is read-only).
    let mounts = c["volumeMounts"].as_sequence().expect("volumeMounts");
    assert!(
        mounts.iter().all(|m| m.get("subPath").is_none()),
        "no subPath mounts"
    );
    let mount_at = |path: &str| -> &Yaml {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
    };
    let config_mount = mount_at("/etc/kanaria");
    // The TLS pair the config names comes from the Secret's directory mount.
    for pair in cfg["proxy"]["tls"]["certificates"]
        .as_array()
        .expect("the ConfigMap terminates TLS")
    {
        let cert = Path::new(pair["cert"].as_str().expect("cert"));
        let tls_mount = mount_at(cert.parent().unwrap().to_str().unwrap());
        let tls_volume = pod["spec"]["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == tls_mount["name"])
            .expect("TLS volume");
        assert_eq!(tls_volume["secret"]["secretName"], "kanaria-tls");
    }
    let volumes = pod["spec"]["volumes"].as_sequence().expect("volumes");
    let config_volume = volumes
        .iter()
        .find(|v| v["name"] == config_mount["name"])
        .expect("config volume");
    assert_eq!(config_volume["configMap"]["name"], "kanaria-config");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    mount_at(cfg["state"]["dir"].as_str().expect("state.dir"));
    let sock = cfg["proxy"]["upgrade_sock"].as_str().expect("upgrade_sock");
    mount_at(Path::new(sock).parent().unwrap().to_str().unwrap());

    // Non-root, with the image's user id.
    let sc = &pod["spec"]["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert!(
        read("Dockerfile").contains(&format!("ARG UID={}", sc["runAsUser"].as_u64().unwrap())),
        "runAsUser is the image's kanaria user"
    );

    // Services, the PodDisruptionBudget and the ServiceMonitor select what they should.
    let svc = object(&objects, "Service", "kanaria");
    assert!(selects(&svc["spec"]["selector"], labels));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    let admin_svc = object(&objects, "Service", "kanaria-admin");
    assert!(selects(&admin_svc["spec"]["selector"], labels));
    assert_eq!(admin_svc["spec"]["ports"][0]["name"], "admin");
    assert_eq!(admin_svc["spec"]["ports"][0]["targetPort"], "admin");
    assert!(
        !selects(
            &object(&objects, "ServiceMonitor", "kanaria")["spec"]["selector"]["matchLabels"],
            &svc["metadata"]["labels"]
        ),
        "the ServiceMonitor scrapes the admin Service, not the traffic one"
    );
    let sm = object(&objects, "ServiceMonitor", "kanaria");
    assert!(selects(
        &sm["spec"]["selector"]["matchLabels"],
        &admin_svc["metadata"]["labels"]
    ));
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    let pdb = object(&objects, "PodDisruptionBudget", "kanaria");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));
    assert!(
        pdb["spec"]["maxUnavailable"].as_u64().unwrap()
            < deploy["spec"]["replicas"].as_u64().unwrap()
    );
}

#[test]
fn compose_dockerfile_and_systemd_unit_match_their_configs() {
    // docker compose: the proxy, two app versions, Prometheus, Grafana.
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    for name in ["kanaria", "app-v1", "app-v2", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "compose service {name}");
    }
    let cfg = toml_table(&read("compose/kanaria/kanaria.toml"), "compose config");
    let k = &compose["services"]["kanaria"];
    let build = &k["build"];
    assert!(deploy_dir()
        .join(s(&build["context"]))
        .join(s(&build["dockerfile"]))
        .is_file());
    assert!(k["environment"]["KANARIA_ADMIN_TOKEN"].is_string());
    // Every bind mount's source exists; the config is mounted as a directory.
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let src = s(v).split(':').next().unwrap();
            if src.starts_with('.') {
                assert!(
                    deploy_dir().join(src).exists(),
                    "compose service {name:?} mounts missing {src}"
                );
            }
        }
        // Published ports are on the host's loopback only.
        for p in svc["ports"].as_sequence().into_iter().flatten() {
            assert!(s(p).starts_with("127.0.0.1:"), "{name:?} publishes {p:?}");
        }
    }
    let volumes: Vec<&str> = k["volumes"].as_sequence().unwrap().iter().map(s).collect();
    assert!(volumes.contains(&"./compose/kanaria:/etc/kanaria:ro"));
    assert!(deploy_dir().join("compose/kanaria").is_dir());
    let stop_grace = humantime::parse_duration(s(&k["stop_grace_period"])).unwrap();
    assert!(stop_grace > duration(&cfg, "proxy", "shutdown_grace", "30s") + Duration::from_secs(5));
    let prom = yaml("compose/prometheus/prometheus.yml");
    assert_eq!(
        prom["scrape_configs"][0]["static_configs"][0]["targets"][0],
        format!("kanaria:{}", listen_port(&cfg, "admin")).as_str()
    );
    let prom_volumes: Vec<&str> = compose["services"]["prometheus"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert!(prom_volumes.contains(&"./prometheus/rules.yml:/etc/prometheus/rules.yml:ro"));
    assert_eq!(prom["rule_files"][0], "rules.yml");
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(ds["datasources"][0]["url"], "http://prometheus:9090");
    let dashboards = yaml("grafana/provisioning/dashboards/kanaria.yml");
    let dash_dir = s(&dashboards["providers"][0]["options"]["path"]);
    let grafana_volumes: Vec<&str> = compose["services"]["grafana"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert!(grafana_volumes
        .contains(&format!("./grafana/kanaria.json:{dash_dir}/kanaria.json:ro").as_str()));

    // Dockerfile: multi-stage with cmake in the builder, a small non-root runtime that runs
    // the mounted config, exposes the listeners of the compose config and stops on SIGTERM.
    let docker = read("Dockerfile");
    let lines: Vec<&str> = docker
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let froms: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage");
    let (build, runtime) = lines.split_at(*froms.last().unwrap());
    let build = build.join("\n");
    assert!(build.contains("cmake") && build.contains("cargo build --release --locked"));
    assert!(runtime[0].contains("slim") || runtime[0].contains("distroless"));
    let user = runtime
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the runtime stage");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    assert!(runtime.contains(&"STOPSIGNAL SIGTERM"));
    let expose = runtime
        .iter()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    for port in [listen_port(&cfg, "proxy"), listen_port(&cfg, "admin")] {
        assert!(
            expose.split_whitespace().any(|p| p == port.to_string()),
            "EXPOSE {port}"
        );
    }
    assert!(runtime.iter().any(|l| l.starts_with("HEALTHCHECK")));
    assert!(runtime.contains(&r#"CMD ["run", "-c", "/etc/kanaria/kanaria.toml"]"#));
    let ignore =
        std::fs::read_to_string(deploy_dir().join("../.dockerignore")).expect(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "target/ is not sent to Docker"
    );

    // systemd: reload by SIGHUP, a state directory the config uses, a stop timeout above
    // the drain.
    let unit = read("systemd/kanaria.service");
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for l in unit.lines().map(str::trim) {
        if l.starts_with('[') {
            section = l.to_string();
        } else if let Some((k, v)) = l.split_once('=').filter(|_| !l.starts_with('#')) {
            keys.entry(format!("{section}{k}"))
                .or_default()
                .push(v.to_string());
        }
    }
    let one = |k: &str| -> &str {
        keys.get(k)
            .and_then(|v| v.last())
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{k} missing in the unit"))
    };
    let sd_cfg = toml_table(&read("systemd/kanaria.toml"), "systemd config");
    assert_eq!(
        one("[Service]ExecStart"),
        "/usr/local/bin/kanaria run -c /etc/kanaria/kanaria.toml"
    );
    assert!(keys["[Service]ExecReload"]
        .iter()
        .any(|v| v.ends_with("kill -HUP $MAINPID")));
    assert_eq!(one("[Service]StateDirectory"), "kanaria");
    assert_eq!(sd_cfg["state"]["dir"].as_str(), Some("/var/lib/kanaria"));
    assert_eq!(one("[Service]RuntimeDirectory"), "kanaria");
    assert!(sd_cfg["proxy"]["upgrade_sock"]
        .as_str()
        .unwrap()
        .starts_with("/run/kanaria/"));
    assert_eq!(one("[Service]KillSignal"), "SIGTERM");
    let stop = humantime::parse_duration(&format!("{}s", one("[Service]TimeoutStopSec"))).unwrap();
    assert!(stop > duration(&sd_cfg, "proxy", "shutdown_grace", "30s") + Duration::from_secs(5));
    assert_eq!(one("[Install]WantedBy"), "multi-user.target");
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let promtool = tool("promtool");
    let run = |args: &[&str], dir: &Path| {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run promtool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        text
    };
    let deploy = deploy_dir();
    let out = run(&["check", "rules", "prometheus/rules.yml"], &deploy);
    assert!(out.contains("SUCCESS"), "{out}");
    // The alerts fire (and stay quiet) on the series of rules_test.yml.
    let out = run(&["test", "rules", "prometheus/rules_test.yml"], &deploy);
    assert!(out.contains("SUCCESS"), "{out}");
    // compose's Prometheus config, with the rules next to it as in the container.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        deploy.join("compose/prometheus/prometheus.yml"),
        dir.path().join("prometheus.yml"),
    )
    .unwrap();
    std::fs::copy(
        deploy.join("prometheus/rules.yml"),
        dir.path().join("rules.yml"),
    )
    .unwrap();
    let out = run(&["check", "config", "prometheus.yml"], dir.path());
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every `kanaria_*` metric name in a PromQL expression.
fn kanaria_metrics(expr: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("kanaria_") {
        let before = rest[..i].chars().next_back();
        let name: String = rest[i..].chars().take_while(|&c| ident(c)).collect();
        if !before.is_some_and(ident) {
            out.insert(name.clone());
        }
        rest = &rest[i + name.len()..];
    }
    out
}

/// The strings under the keys PromQL lives in: `expr` (panels, annotations) and `query` /
/// `definition` (template variables).
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(q)) => {
                        out.push(q.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_query_only_metrics_kanaria_exports() {
    // A running Kanaria with health checks, some traffic and a rollback, so every metric
    // family has a series; in a fleet (a real redis-server), for the fleet's metrics.
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let redis = common::Redis::start().await;
    let routes = format!(
        "[fleet]\nurl = \"{}\"\ncluster = \"deploy\"\ninstance = \"k1\"\npoll_interval = \"200ms\"\n\n[[routes]]\nname = \"app\"\ncanary_weight = 50\nsticky_by = [\"header:x-user-id\"]\n[routes.health]\npath = \"/healthz\"\ninterval = \"200ms\"\n{}\n{}",
        redis.url(),
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .env("KANARIA_ADMIN_TOKEN", "tok")
        .start()
        .await;
    proxy
        .wait_status("the fleet's members", |s| {
            s["fleet"]["members"].as_array().map(Vec::len) == Some(1)
        })
        .await;
    for (status, _) in common::send_users(&proxy, 20, "user").await {
        assert_eq!(status, 200);
    }
    assert_eq!(proxy.act("rollback", "tok").await, 200);
    let text = proxy.metrics().await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    for series in [
        r#"kanaria_rollbacks_total{reason="manual",route="app"} 1"#,
        r#"kanaria_rollout_state{route="app",state="rolled_back"} 1"#,
        r#"kanaria_config_reloads_total{result="error"} 0"#,
        r#"code_class="5xx""#,
        r#"code_class="error""#,
        r#"kanaria_endpoint_healthy{endpoint="#,
        r#"kanaria_fleet_connected{cluster="deploy"} 1"#,
        r#"kanaria_fleet_members{cluster="deploy"} 1"#,
        r#"kanaria_fleet_generation{cluster="deploy",route="app"}"#,
    ] {
        assert!(text.contains(series), "no {series} in /metrics:\n{text}");
    }

    // The dashboard: weights, error rate and p99 per version, rollbacks, reloads, and
    // nothing that Kanaria does not export.
    let dash: serde_json::Value =
        serde_json::from_str(&read("grafana/kanaria.json")).expect("dashboard JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dash, &mut queries);
    assert!(queries.len() > 10, "{queries:?}");
    let mut used = BTreeSet::new();
    for q in &queries {
        used.extend(kanaria_metrics(q));
    }
    for m in &used {
        assert!(
            exported.contains(m),
            "the dashboard queries {m}, which Kanaria does not export"
        );
    }
    for m in [
        "kanaria_canary_weight_percent",
        "kanaria_requests_total",
        "kanaria_request_duration_seconds_bucket",
        "kanaria_rollbacks_total",
        "kanaria_config_reloads_total",
    ] {
        assert!(used.contains(m), "the dashboard does not show {m}");
    }
    assert!(queries
        .iter()
        .any(|q| q.contains("histogram_quantile(0.99") && q.contains("version")));

    // The rules: every metric exported, every recorded series used by an alert defined.
    let rules = yaml("prometheus/rules.yml");
    let mut recorded = BTreeSet::new();
    let mut alerts = BTreeMap::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = s(&rule["expr"]);
            for m in kanaria_metrics(expr) {
                assert!(
                    exported.contains(&m),
                    "rule {rule:?} uses {m}, which Kanaria does not export"
                );
            }
            if let Some(r) = rule["record"].as_str() {
                recorded.insert(r.to_string());
            }
            if let Some(a) = rule["alert"].as_str() {
                alerts.insert(a.to_string(), expr.to_string());
            }
        }
    }
    for a in [
        "KanariaCanaryRolledBack",
        "KanariaConfigReloadFailing",
        "KanariaNoHealthyStableEndpoint",
        "KanariaErrorBudgetBurnFast",
        "KanariaErrorBudgetBurnSlow",
        "KanariaFleetDisconnected",
        "KanariaFleetGenerationLag",
    ] {
        assert!(alerts.contains_key(a), "no alert {a}");
    }
    for (name, expr) in &alerts {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if word.starts_with("kanaria:") {
                assert!(
                    recorded.contains(word),
                    "{name} uses {word}, which no rule records"
                );
            }
        }
    }
}
