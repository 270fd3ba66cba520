"""Checks of deploy/ that need a YAML parser, run by tests/deploy.rs in its virtual environment (PyYAML comes with
kubernetes-validate). Each check prints one line per problem and exits 1 when there is any.

  check.py manifests ROOT   cross-references the Kubernetes files kubernetes-validate cannot check (the
                            kustomizations, the KEDA and Prometheus Operator resources, the PrometheusRule against
                            deploy/prometheus/alerts.yaml) and the Deployment's settings
  check.py alerts ROOT      every required alert exists; every alert has `for`, a severity, a summary, a
                            runbook_url whose anchor is a heading of docs/operations.md, and a test case that fires
                            it and one that keeps it quiet
  check.py dashboard ROOT   the dashboard's panels and the provisioning file are well formed, and the panels chart
                            every metric the dashboard is for
  check.py names ROOT       prints every metric name the dashboard and the alerts use, one per line
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

problems = []


def problem(msg):
    problems.append(msg)


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests(root):
    k8s = root / "deploy" / "kubernetes"
    listed = {}
    resources = {}
    for kust in sorted(k8s.rglob("kustomization.yaml")):
        k = yaml.safe_load(kust.read_text())
        for r in k.get("resources", []):
            f = (kust.parent / r).resolve()
            if not f.exists():
                problem(f"{kust}: resource {r} does not exist")
            listed[f] = kust
        for g in k.get("configMapGenerator", []):
            for f in g.get("files", []):
                if not (kust.parent / f).exists():
                    problem(f"{kust}: configMapGenerator file {f} does not exist")
            resources[("ConfigMap", g["name"])] = {"kind": "ConfigMap", "metadata": {"name": g["name"]}}
    for f in sorted(k8s.rglob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        if f.resolve() not in listed:
            problem(f"{f}: not listed in any kustomization.yaml")
        for d in docs(f):
            resources[(d["kind"], d["metadata"]["name"])] = d

    def get(kind, name):
        r = resources.get((kind, name))
        if r is None:
            problem(f"no {kind} named {name}")
        return r or {}

    deploy = get("Deployment", "agent-connection-manager")
    spec = deploy.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
    if spec.get("replicas") != 3:
        problem("Deployment: replicas is not 3")
    if not all(labels.get(k) == v for k, v in spec.get("selector", {}).get("matchLabels", {}).items()):
        problem("Deployment: the selector does not match the pod's labels")
    cfg = tomllib.loads((k8s / "config.toml").read_text())
    grace = cfg.get("worker", {}).get("shutdown_grace_secs", 20)
    if not pod.get("terminationGracePeriodSeconds", 30) > grace:
        problem(f"Deployment: terminationGracePeriodSeconds is not above worker.shutdown_grace_secs ({grace})")
    if cfg.get("http", {}).get("listen", "").split(":")[0] != "0.0.0.0":
        problem("config.toml: http.listen must bind 0.0.0.0 in a pod")
    if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
        problem("Deployment: runAsNonRoot is not set")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    containers = pod.get("initContainers", []) + pod.get("containers", [])
    if [c.get("args") for c in pod.get("initContainers", [])] != [["migrate"]]:
        problem("Deployment: the one init container must run `migrate`")
    for c in containers:
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
            problem(f"container {c['name']}: readOnlyRootFilesystem and allowPrivilegeEscalation: false are required")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problem(f"container {c['name']}: capabilities must drop ALL")
        if "memory" not in c.get("resources", {}).get("limits", {}):
            problem(f"container {c['name']}: no memory limit")
        for e in c.get("envFrom", []):
            get("Secret", e["secretRef"]["name"])
        for m in c.get("volumeMounts", []):
            v = volumes.get(m["name"])
            if v is None:
                problem(f"container {c['name']}: mounts unknown volume {m['name']}")
            elif "configMap" in v:
                get("ConfigMap", v["configMap"]["name"])
    worker = next((c for c in pod.get("containers", []) if c["name"] == "worker"), {})
    ports = {p["name"]: p["containerPort"] for p in worker.get("ports", [])}
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")]:
        http = worker.get(probe, {}).get("httpGet", {})
        if http.get("path") != path or http.get("port") not in ports:
            problem(f"worker: {probe} must GET {path} on a named container port")
    if ports.get("http") != int(cfg.get("http", {}).get("listen", ":0").rsplit(":", 1)[1]):
        problem("worker: the `http` port is not the port of http.listen")

    def selects(selector, what):
        if not selector or not all(labels.get(k) == v for k, v in selector.items()):
            problem(f"{what}: its selector does not select the worker's pods")

    svc = get("Service", "agent-connection-manager")
    selects(svc.get("spec", {}).get("selector"), "Service")
    svc_ports = {p["name"] for p in svc.get("spec", {}).get("ports", [])}
    pdb = get("PodDisruptionBudget", "agent-connection-manager")
    selects(pdb.get("spec", {}).get("selector", {}).get("matchLabels"), "PodDisruptionBudget")
    if pdb.get("spec", {}).get("maxUnavailable") != 1:
        problem("PodDisruptionBudget: maxUnavailable is not 1")

    so = get("ScaledObject", "agent-connection-manager").get("spec", {})
    if so.get("scaleTargetRef", {}).get("name") != "agent-connection-manager":
        problem("ScaledObject: scaleTargetRef does not name the Deployment")
    if not 1 <= so.get("minReplicaCount", 0) <= so.get("maxReplicaCount", 0):
        problem("ScaledObject: minReplicaCount and maxReplicaCount are not an interval")
    queues = set()
    for t in so.get("triggers", []):
        if t.get("type") != "rabbitmq":
            problem(f"ScaledObject: unexpected trigger {t.get('type')}")
        queues.add(t["metadata"].get("queueName"))
        if not str(t["metadata"].get("value", "")).isdigit():
            problem(f"ScaledObject: trigger {t['metadata'].get('queueName')} has no numeric value")
        auth = get("TriggerAuthentication", t.get("authenticationRef", {}).get("name", ""))
        for ref in auth.get("spec", {}).get("secretTargetRef", []):
            secret = get("Secret", ref["name"])
            if ref["key"] not in secret.get("stringData", {}) and ref["key"] not in secret.get("data", {}):
                problem(f"TriggerAuthentication: Secret {ref['name']} has no key {ref['key']}")
    if queues != {"agent.commands", "agent.heartbeats"}:
        problem(f"ScaledObject: triggers on {sorted(queues)}, not the command and heartbeat queues")

    rule = get("PrometheusRule", "agent-connection-manager").get("spec", {})
    alerts_file = yaml.safe_load((root / "deploy" / "prometheus" / "alerts.yaml").read_text())
    if rule.get("groups") != alerts_file["groups"]:
        problem("PrometheusRule: its groups differ from deploy/prometheus/alerts.yaml's")

    sm = get("ServiceMonitor", "agent-connection-manager").get("spec", {})
    svc_labels = svc.get("metadata", {}).get("labels", {})
    if not all(svc_labels.get(k) == v for k, v in sm.get("selector", {}).get("matchLabels", {}).items()):
        problem("ServiceMonitor: its selector does not select the Service")
    for e in sm.get("endpoints", []):
        if e.get("port") not in svc_ports or e.get("path") != "/metrics":
            problem("ServiceMonitor: an endpoint does not scrape /metrics on a Service port")


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


# No ready worker; no relay holding the lease; oldest unpublished event too old; dead letters growing; a
# stale-connection storm and a brake held; the broker blocking publishers; the database pool exhausted; the heartbeat
# backlog growing; a sweeper task failing cycle after cycle.
REQUIRED_ALERTS = [
    "AcmNoReadyWorker", "AcmNoRelayLeader", "AcmOutboxEventTooOld", "AcmDeadLettersGrowing",
    "AcmStaleConnectionStorm", "AcmStaleBrakeHeld", "AcmBrokerBlockingPublishers", "AcmDatabasePoolExhausted",
    "AcmHeartbeatBacklogGrowing", "AcmSweeperTaskFailing",
]


def alerts(root):
    rules = yaml.safe_load((root / "deploy" / "prometheus" / "alerts.yaml").read_text())
    tests = yaml.safe_load((root / "deploy" / "prometheus" / "alerts.test.yaml").read_text())
    ops = (root / "docs" / "operations.md").read_text()
    anchors = {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", ops, re.M)}
    fires, quiet = set(), set()
    for t in tests.get("tests", []):
        for a in t.get("alert_rule_test", []):
            (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
    names = []
    for g in rules["groups"]:
        for r in g["rules"]:
            name = r.get("alert")
            if not name:
                problem(f"a recording rule ({r.get('record')}): only alerts are expected here")
                continue
            names.append(name)
            if "for" not in r:
                problem(f"{name}: no `for`")
            if r.get("labels", {}).get("severity") not in ("critical", "warning"):
                problem(f"{name}: severity is not critical or warning")
            ann = r.get("annotations", {})
            if not ann.get("summary"):
                problem(f"{name}: no summary")
            url = ann.get("runbook_url", "")
            if "/docs/operations.md#" not in url:
                problem(f"{name}: runbook_url does not point into docs/operations.md")
            elif url.split("#", 1)[1] not in anchors:
                problem(f"{name}: runbook_url's anchor #{url.split('#', 1)[1]} is no heading of docs/operations.md")
            if name not in fires:
                problem(f"{name}: no test case makes it fire")
            if name not in quiet:
                problem(f"{name}: no test case keeps it quiet")
    if len(names) != len(set(names)):
        problem("an alert name is used twice")
    for required in REQUIRED_ALERTS:
        if required not in names:
            problem(f"no alert {required}")
    print(f"{len(names)} alerts: {' '.join(names)}")


# What the dashboard must chart: heartbeat ingest and batch sizes, commands by type and outcome with latency, events
# published and publish-to-confirm latency, outbox backlog and oldest age, sweeper changes, durations and brake, dead
# letters by reason, pool use, active connections and sessions, process memory and CPU.
DASHBOARD_METRICS = [
    "acm_messages_consumed_total", "acm_heartbeat_batch_size_bucket", "acm_command_seconds_bucket",
    "acm_events_published_total", "acm_publish_confirm_seconds_bucket", "acm_outbox_backlog",
    "acm_outbox_oldest_age_seconds", "acm_sweeper_changes_total", "acm_sweeper_task_seconds_bucket",
    "acm_sweeper_brake_holds_total", "acm_messages_dead_lettered_total", "acm_db_pool_size", "acm_db_pool_available",
    "acm_db_pool_waiting", "acm_active_connections", "acm_active_sessions", "process_resident_memory_bytes",
    "process_cpu_seconds_total",
]


def dashboard(root):
    g = root / "deploy" / "grafana"
    d = json.loads((g / "agent-connection-manager.json").read_text())
    exprs = " ".join(t["expr"] for p in d["panels"] for t in p.get("targets", []))
    for m in DASHBOARD_METRICS:
        if not re.search(rf"\b{m}\b", exprs):
            problem(f"dashboard: no panel charts {m}")
    ids = [p["id"] for p in d["panels"]]
    if len(ids) != len(set(ids)):
        problem("dashboard: panel ids are not unique")
    variables = {v["name"] for v in d["templating"]["list"]}
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        gp = p["gridPos"]
        if gp["x"] + gp["w"] > 24:
            problem(f"panel {p['title']}: wider than the dashboard")
        if p.get("datasource", {}).get("uid") != "${datasource}" or not p.get("targets"):
            problem(f"panel {p['title']}: no targets on the dashboard's data source")
        for t in p.get("targets", []):
            for v in re.findall(r"\$(\w+)", t["expr"]):
                if v not in variables and not v.startswith("__"):
                    problem(f"panel {p['title']}: unknown variable ${v}")
    prov = yaml.safe_load((g / "dashboards.yaml").read_text())
    if prov.get("apiVersion") != 1 or not all(p.get("type") == "file" and p["options"].get("path") for p in prov["providers"]):
        problem("dashboards.yaml: not a file provider with a path")
    print(f"{len(ids)} panels")


def names(root):
    exprs = []
    d = json.loads((root / "deploy" / "grafana" / "agent-connection-manager.json").read_text())
    exprs += [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in d["templating"]["list"] if isinstance(v.get("query"), dict)]
    rules = yaml.safe_load((root / "deploy" / "prometheus" / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    found = set()
    for e in exprs:
        # Metric names: identifiers not followed by '(' (a function) nor by '=', '!=', '=~' (a label), outside quotes.
        bare = re.sub(r'"[^"]*"', '""', e)
        # Grafana's label_values(selector, label): the label is not a metric.
        bare = re.sub(r"(label_values\(.*),\s*\w+\s*\)", r"\1)", bare)
        here = {m.group(1) for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*[(=!~])", bare)}
        keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                    "offset", "inf", "nan", "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk",
                    "bottomk", "quantile", "count_values", "group"}
        here = {n for n in here if n not in keywords and not re.fullmatch(r"[0-9].*", n)}
        # Label names in by (...) / without (...) lists are not metrics.
        for lst in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", bare):
            here -= {x.strip() for x in lst.split(",")}
        # $variables and [$__rate_interval] are not metrics.
        here -= set(re.findall(r"\$(\w+)", bare))
        metrics = {n for n in here if n.startswith(("acm_", "process_"))}
        if not metrics:
            problem(f"names no acm_ or process_ metric: {e}")
        for n in here - metrics:
            problem(f"names {n}, which is not a metric of the worker: {e}")
        found |= metrics
    for n in sorted(found):
        print(n)


def main():
    what, root = sys.argv[1], Path(sys.argv[2])
    {"manifests": manifests, "alerts": alerts, "dashboard": dashboard, "names": names}[what](root)
    for p in problems:
        print(f"PROBLEM: {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
