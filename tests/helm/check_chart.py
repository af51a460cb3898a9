"""Checks of the Helm chart (helm/cipherhorizon), offline, with the Helm library itself
(helm-python-sdk wraps Helm v4's Go code), the Kubernetes API schemas (kubernetes-validate)
and yamllint; run by `make test` (scripts/venv.sh --chart installs them into .venv).

- `helm lint --strict` passes with the default values and with a production-like set;
- the values schema refuses what the workers would refuse (a typo in a key, an unknown worker,
  a sync mode, a subject prefix or schema name they reject, no database at all);
- rendered (hooks included), every manifest is valid Kubernetes 1.30 in strict mode;
- one Deployment per crate under workers/, running that binary; the database URL (from the
  chart's Secret, or from the user's) reaches the workers that use Postgres and no command
  worker; the NATS URL every pod, as a value or from the user's Secret; the setup job runs `chctl setup` as a hook after the Secret it reads;
- every variable a pod gets is one README's Configuration documents, and numbers keep their
  digits (Helm reads whole numbers as floats: 1000000 must not become 1e+06).

Prints 'helm chart: N passed' or each failure; exit status 1 on failure.
"""

import re
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cipherhorizon"
KUBE = "1.30.0"

passed, failed = 0, 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name}: {detail}", file=sys.stderr)


def lint_errors(values):
    """Helm's lint messages of warning or error severity (the schema is checked by lint)."""
    result = helm.lint(str(CHART), values, strict=True, namespace="ch")
    return [m for m in result["messages"] if m["severity"] >= 2] + [
        {"error": e} for e in result.get("errors") or []
    ]


def schema_refuses(values):
    """Does lint fail on the values schema itself (not a template's `fail`, not a warning)?"""
    return any("don't meet the specifications of the schema" in str(e.get("error"))
               for e in lint_errors(values))


def render_files(values, release="ch"):
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=release, namespace="ch", is_install=True)


def render(values, release="ch"):
    """Every rendered manifest, hooks and test pods included, as parsed documents."""
    docs = []
    for path, text in sorted(render_files(values, release).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def render_refusal(values):
    """Helm's error when the chart refuses to render these values, else "rendered"."""
    try:
        render(values)
        return "rendered"
    except Exception as e:  # the SDK raises Helm's error as it is
        return str(e)


def chctl_workers():
    """`WORKERS` of cli/chctl/src/common.rs: what `chctl status --skip` accepts."""
    text = (ROOT / "cli" / "chctl" / "src" / "common.rs").read_text()
    block = text.split("pub const WORKERS", 1)[1].split("];", 1)[0]
    return sorted(re.findall(r'"([a-z-]+)"', block))


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def deployments_of(docs):
    """The Deployments by the worker they run (their component label)."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
            for d in by_kind(docs, "Deployment")}


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def documented_variables():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.M))


PRODUCTION = {
    "nats": {"existingSecret": "nats-app", "subjectPrefix": "prod",
             "tls": {"existingSecret": "nats-client"}},
    "database": {"existingSecret": "pg-app", "existingSecretKey": "uri", "pool": 4},
    "sync": {"mode": "adaptive", "replayBatchMax": 1000000, "batchWaitMs": 2},
    "setup": {"streamReplicas": 3},
    "workers": {
        "cmd-signal": {"enabled": True, "replicas": 4,
                       "resources": {"requests": {"cpu": "500m", "memory": "128Mi"}},
                       "env": {"CH_WORKER_THREADS": 2},
                       "extraEnv": [{"name": "CH_LOG_FORMAT", "value": "text"}]},
        "query-portfolio": {"enabled": True, "replicas": 2, "terminationGracePeriodSeconds": 45,
                            "extraEnv": [{"name": "CH_DATABASE_URL", "valueFrom": {
                                "secretKeyRef": {"name": "pg-readonly", "key": "url"}}}]},
        "cmd-market": {"enabled": False, "replicas": 1},
        "exit-triggers": {"enabled": True, "replicas": 0},
    },
    "env": {"CH_WORKER_THREADS": 1},
    "tolerations": [{"key": "trading", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"pool": "trading"},
    "extraVolumes": [{"name": "pg-ca", "secret": {"secretName": "pg-ca"}}],
    "extraVolumeMounts": [{"name": "pg-ca", "mountPath": "/etc/cipherhorizon/pg-ca",
                           "readOnly": True}],
}


def main():
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())
    version = workspace["workspace"]["package"]["version"]
    workers = sorted(p.parent.name for p in ROOT.glob("workers/*/Cargo.toml"))
    documented = documented_variables()
    check("README documents the variables", {"CH_NATS_URL", "CH_SYNC"} <= documented,
          sorted(documented))
    check("the chart's workers are chctl's (status --skip takes their names)",
          chctl_workers() == workers, (chctl_workers(), workers))

    # The chart's own files.
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    check("appVersion is the workspace's version", meta["appVersion"] == version,
          f"{meta['appVersion']} vs {version}")
    conf = YamlLintConfig("{extends: default, rules: {line-length: {max: 100}, "
                          "document-start: disable}}")
    for f in ("Chart.yaml", "values.yaml"):
        problems = list(linter.run((CHART / f).read_text(), conf))
        check(f"yamllint {f}", not problems, [str(p) for p in problems])

    # Lint: clean with the defaults and with a production-like set.
    for label, values in (("default", {}), ("production", PRODUCTION)):
        errors = lint_errors(values)
        check(f"lint --strict ({label} values)", not errors, errors)

    # The schema refuses what the workers would refuse.
    refused = {
        "an unknown top-level key": {"replica": 2},
        "an unknown worker": {"workers": {"cmd-foo": {"enabled": True, "replicas": 1}}},
        "a typo in a worker's key": {"workers": {"cmd-signal": {"enabled": True, "replica": 3}}},
        "negative replicas": {"workers": {"cmd-signal": {"enabled": True, "replicas": -1}}},
        "an unknown sync mode": {"sync": {"mode": "fast"}},
        "a subject prefix with a dot": {"nats": {"subjectPrefix": "a.b"}},
        "an upper-case schema": {"database": {"schema": "MySchema"}},
        "a schema PostgreSQL reserves": {"database": {"schema": "pg_desk"}},
        "a pool of one (a projector's lock holds a session)": {"database": {"pool": 1}},
        "no database": {"database": {"url": "", "existingSecret": ""}},
        "no NATS": {"nats": {"url": ""}},
        "a batch above CH_BATCH_MAX's range": {"sync": {"batchMax": 20000}},
        "a variable name that is not one": {"env": {"CH-SYNC": "batch"}},
        "the prefix through env (past its checks)": {"env": {"CH_SUBJECT_PREFIX": "desk"}},
        "the prefix through a worker's env": {"workers": {"cmd-signal": {
            "enabled": True, "replicas": 1, "env": {"CH_SUBJECT_PREFIX": "desk"}}}},
        "a number as an extraEnv value": {"extraEnv": [{"name": "CH_WORKER_THREADS",
                                                         "value": 2}]},
        "an extraEnv entry with both value and valueFrom": {"extraEnv": [{
            "name": "X", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        "a pod label the chart owns": {"podLabels": {"app.kubernetes.io/component": "x"}},
        "an unknown log format": {"log": {"format": "xml"}},
    }
    for label, values in refused.items():
        check(f"schema refuses {label}", schema_refuses(values), (values, lint_errors(values)))

    # Without the setup job and the test pod: nothing else changes, no hook Secret is left.
    docs = render({"setup": {"enabled": False}, "tests": {"enabled": False}})
    kinds = sorted(d["kind"] for d in docs)
    check("setup and tests disabled: only the Deployments and the release's Secret",
          kinds == ["Deployment"] * len(workers) + ["Secret"], kinds)

    # A prefix whose schema PostgreSQL would refuse fails the install, unless a schema is given.
    refusal = render_refusal({"nats": {"subjectPrefix": "PG-desk"}})
    check("a prefix that makes a pg_ schema fails the install",
          "reserves names beginning with pg_" in refusal, refusal)
    check("a prefix that makes a pg_ schema passes with a schema of its own",
          not lint_errors({"nats": {"subjectPrefix": "PG-desk"}, "database": {"schema": "desk"}}))

    # What the schema cannot see, a variable of `env` or `extraEnv` past the values' checks,
    # fails the render as the worker would fail its start, naming the pod and the variable.
    def worker(name, **extra):
        return {"workers": {name: {"enabled": True, "replicas": 2, **extra}}}
    for label, values, want in (
        ("a projector's pool of one", worker("proj-strategy", env={"CH_DB_POOL": 1}),
         'workers.proj-strategy: CH_DB_POOL="1"'),
        ("a sync mode in capitals", {"env": {"CH_SYNC": "Immediate"}},
         'env or extraEnv (every pod): CH_SYNC="Immediate"'),
        ("threads of zero in extraEnv", {"extraEnv": [{"name": "CH_WORKER_THREADS",
                                                       "value": "0"}]}, "CH_WORKER_THREADS"),
        ("a batch that is not a number", {"env": {"CH_BATCH_MAX": "5k"}}, 'CH_BATCH_MAX="5k"'),
        ("a query bound under 100 ms", {"env": {"CH_QUERY_TIMEOUT_MS": 50}},
         "CH_QUERY_TIMEOUT_MS"),
        ("an immediate bound past the grace period",
         {"sync": {"mode": "immediate", "immediateTimeoutMs": 25000}},
         "CH_IMMEDIATE_TIMEOUT_MS=25000 leaves less than 10 s"),
        ("a query bound past a query worker's grace period",
         worker("query-strategy", env={"CH_QUERY_TIMEOUT_MS": 60000}),
         "workers.query-strategy: CH_QUERY_TIMEOUT_MS=60000, with 11 s of min_stream_seq wait"),
        ("a chart-wide query bound past the query workers' grace period",
         {"env": {"CH_QUERY_TIMEOUT_MS": 15000}}, "CH_QUERY_TIMEOUT_MS=15000, with 11 s"),
        ("a chart-wide pool of one (the projectors and the setup job need 2)",
         {"env": {"CH_DB_POOL": 1}}, 'env or extraEnv (every pod): CH_DB_POOL="1"'),
    ):
        refusal = render_refusal(values)
        check(f"the render refuses {label}", want in refusal, refusal)
    for label, values in (
        ("a query worker's own pool", worker("query-portfolio", env={"CH_DB_POOL": "12"})),
        ("an extraEnv value from a Secret", {"extraEnv": [{"name": "CH_DB_POOL", "valueFrom": {
            "secretKeyRef": {"name": "s", "key": "k"}}}]}),
        ("an immediate bound 10 s under the grace period",
         {"sync": {"mode": "immediate", "immediateTimeoutMs": 20000}}),
        ("a long immediate bound with a longer grace period",
         {"sync": {"mode": "immediate", "immediateTimeoutMs": 60000},
          "terminationGracePeriodSeconds": 70}),
        ("a long bound when the mode is not immediate", {"sync": {"immediateTimeoutMs": 60000}}),
        ("a query worker's pool of one", worker("query-strategy", env={"CH_DB_POOL": "1"})),
        ("a query bound 5 s under the grace period with the wait",
         worker("query-portfolio", env={"CH_QUERY_TIMEOUT_MS": 14000})),
        ("a long query bound with a longer grace period",
         worker("query-portfolio", env={"CH_QUERY_TIMEOUT_MS": 60000},
                terminationGracePeriodSeconds=80)),
        ("a long query bound for the other workers only",
         worker("cmd-signal", env={"CH_QUERY_TIMEOUT_MS": 60000})),
    ):
        check(f"the render takes {label}", render_refusal(values) == "rendered",
              render_refusal(values))

    # The schema follows the prefix unless given (releases on other prefixes keep apart).
    for values, want in (({}, "public"), ({"nats": {"subjectPrefix": "Desk-2"}}, "desk_2"),
                         ({"nats": {"subjectPrefix": "x"}, "database": {"schema": "s"}}, "s")):
        (pod,) = by_kind(render(values), "Pod")
        got = env_of(pod["spec"]["containers"][0]).get("CH_DB_SCHEMA", {}).get("value")
        check(f"CH_DB_SCHEMA for {values}", got == want, got)

    # NOTES show no credentials of a NATS URL (a password may hold an `@`).
    notes = render_files({"nats": {"url": "nats://user:p@ss@a:4222,nats://tok@b:4222"}})
    notes = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    check("NOTES hide NATS credentials", "ss@" not in notes and "tok@" not in notes
          and "nats://***@a:4222,nats://***@b:4222" in notes, notes)
    # NOTES name CH_SYNC as the pods get it: `env`, then `extraEnv`, and a worker's own.
    for values, want in (({}, "CH_SYNC=eventual):"),
                         ({"env": {"CH_SYNC": "batch"}}, "CH_SYNC=batch):"),
                         ({"extraEnv": [{"name": "CH_SYNC", "value": "immediate"}]},
                          "CH_SYNC=immediate):"),
                         ({"workers": {"proj-portfolio": {"env": {"CH_SYNC": "adaptive"}}}},
                          "CH_SYNC=eventual (adaptive for proj-portfolio)):"),
                         # The chart-wide extraEnv replaces a worker's own env, as in its pod.
                         ({"extraEnv": [{"name": "CH_SYNC", "value": "immediate"}],
                           "workers": {"proj-portfolio": {"env": {"CH_SYNC": "adaptive"}}}},
                          "CH_SYNC=immediate):"),
                         ({"extraEnv": [{"name": "CH_SYNC", "value": "immediate"}],
                           "workers": {"proj-portfolio": {"extraEnv": [
                               {"name": "CH_SYNC", "value": "batch"}]}}},
                          "CH_SYNC=immediate (batch for proj-portfolio)):")):
        text = next(v for k, v in render_files(values).items() if k.endswith("NOTES.txt"))
        check(f"NOTES say {want} for {values}", want in text, text)
    # A projector off while workers that read its read model run: NOTES warn.
    for values, want in (({}, None),
                         ({"workers": {"proj-portfolio": {"enabled": False}}},
                          "proj-portfolio does not run in this release, and query-portfolio, "
                          "query-strategy, exit-triggers read"),
                         ({"workers": {"proj-strategy": {"enabled": True, "replicas": 0}}},
                          "proj-strategy does not run in this release, and query-strategy, "
                          "exit-triggers read"),
                         # exit-triggers waits for both read models: its exits never fire.
                         ({"workers": {"proj-strategy": {"enabled": False},
                                       "query-strategy": {"enabled": False}}},
                          "proj-strategy does not run in this release, and exit-triggers read "
                          "its read model:"),
                         ({"workers": {"proj-strategy": {"enabled": False},
                                       "query-strategy": {"enabled": False},
                                       "exit-triggers": {"enabled": False}}}, None)):
        text = next(v for k, v in render_files(values).items() if k.endswith("NOTES.txt"))
        check(f"NOTES warn of a projector off for {values}: {want is not None}",
              ("WARNING" in text) == (want is not None) and (want is None or want in text), text)
    # Also in URLs without a scheme, which the workers take too.
    notes = render_files({"nats": {"url": "user:s3cret@a:4222,tok3n@b:4222"}})
    notes = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    check("NOTES hide NATS credentials of URLs without a scheme", "s3cret" not in notes
          and "tok3n" not in notes and "***@a:4222,***@b:4222" in notes, notes)
    # The connection budget: pool per pod that uses Postgres (a projector's lock session is
    # one of its pool's), with a rolling update's extra pod per Deployment. Defaults: 8 such
    # pods of pool 6, 13 in an upgrade; then one query worker's own pool (2 pods of 20).
    for values, want in (({}, 78),
                         ({"workers": {"query-strategy": {"env": {"CH_DB_POOL": "20"}}}}, 106),
                         ({"extraEnv": [{"name": "CH_DB_POOL", "value": "10"}]}, 130)):
        notes = render_files(values)
        notes = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
        check(f"NOTES count {want} Postgres connections for {values}",
              f"at most about {want} connections" in notes, notes)

    # A new database.url rolls the workers (their pod templates change with it); a Secret of
    # the user's is theirs to roll.
    def templates(values):
        return {d["metadata"]["name"]: d["spec"]["template"]
                for d in by_kind(render(values), "Deployment")}
    one = templates({})
    two = templates({"database": {"url": "postgres://app:rotated@db2:5432/ch"}})
    check("a new database.url changes every worker's pod template",
          all(one[n] != two[n] for n in one), sorted(n for n in one if one[n] == two[n]))
    mine = templates({"database": {"existingSecret": "pg"}})
    check("no checksum of a URL the chart does not hold", all(
        "checksum/database-url" not in t["metadata"].get("annotations", {})
        for t in mine.values()))

    # extraEnv of the chart and of a worker name the same variable: the worker's, once.
    ro = {"name": "CH_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "ro", "key": "url"}}}
    rw = {"name": "CH_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "pg", "key": "url"}}}
    docs = render({"extraEnv": [rw], "workers": {"query-portfolio": {
        "enabled": True, "replicas": 1, "extraEnv": [ro]}}})
    query = deployments_of(docs)["query-portfolio"]
    urls = [e for e in query["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"] == "CH_DATABASE_URL"]
    check("a worker's extraEnv wins over the chart's, one entry", urls == [ro], urls)

    # The setup job and the test pod carry podAnnotations (a sidecar's opt-out) and podLabels.
    docs = render({"podAnnotations": {"sidecar.istio.io/inject": "false"},
                   "podLabels": {"team": "trading"}})
    for kind, meta in (("Job", lambda d: d["spec"]["template"]["metadata"]),
                       ("Pod", lambda d: d["metadata"])):
        (d,) = by_kind(docs, kind)
        m = meta(d)
        check(f"the {kind} carries podAnnotations and podLabels",
              m.get("annotations", {}).get("sidecar.istio.io/inject") == "false"
              and m["labels"].get("team") == "trading", m)
    (pod,) = by_kind(docs, "Pod")
    check("the test pod stays a helm test hook",
          pod["metadata"]["annotations"].get("helm.sh/hook") == "test", pod["metadata"])
    for d in by_kind(docs, "Deployment"):
        sel = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        check(f"{d['metadata']['name']}: its selector matches its pods",
              all(labels.get(k) == v for k, v in sel.items()), (sel, labels))

    # Two long release names that share their first 40 characters keep apart; an override.
    names = [sorted(d["metadata"]["name"] for d in render({}, release=r))
             for r in ("cipherhorizon-trading-desk-eu-west-1-prod-blue",
                       "cipherhorizon-trading-desk-eu-west-1-prod-green")]
    check("long release names do not collide", not set(names[0]) & set(names[1]), names)
    check("names stay within 63 characters", all(len(n) <= 63 for n in names[0]), names[0])
    names = {d["metadata"]["name"] for d in render({"fullnameOverride": "desk"})}
    check("fullnameOverride names the objects", "desk-cmd-signal" in names, sorted(names))

    # NATS TLS with the system's CAs and a client certificate (caKey empty): no CA file.
    docs = render({"nats": {"tls": {"existingSecret": "nats-client", "caKey": ""}}})
    for d in by_kind(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        env = env_of(spec["containers"][0])
        check(f"{d['metadata']['name']}: a client certificate without a CA file",
              "CH_NATS_CA_FILE" not in env and "CH_NATS_CERT_FILE" in env
              and [i["key"] for i in spec["volumes"][0]["secret"]["items"]]
              == ["tls.crt", "tls.key"], (env, spec["volumes"]))
    check("schema refuses a NATS TLS Secret with neither a CA nor a certificate key",
          schema_refuses({"nats": {"tls": {"existingSecret": "s", "caKey": "",
                                           "certKey": ""}}}))

    # A worker's empty resources clear the chart's (as values.yaml says: they replace them).
    docs = render({"workers": {"cmd-market": {"enabled": True, "replicas": 1,
                                              "resources": {}}}})
    market = deployments_of(docs)["cmd-market"]
    c = market["spec"]["template"]["spec"]["containers"][0]
    check("a worker's empty resources replace the chart's", "resources" not in c, c)

    for label, values in (("default", {}), ("production", PRODUCTION)):
        docs = render(values)
        for d in docs:
            try:
                kubernetes_validate.validate(d, KUBE, strict=True)
                ok, why = True, ""
            except kubernetes_validate.ValidationError as e:
                ok, why = False, e.message
            check(f"{label}: {d['kind']} {d['metadata']['name']} is valid Kubernetes {KUBE}",
                  ok, why)

        deployments = deployments_of(docs)
        enabled = [w for w in workers
                   if values.get("workers", {}).get(w, {}).get("enabled", True)]
        check(f"{label}: one Deployment per enabled worker crate", sorted(deployments) == enabled,
              f"{sorted(deployments)} vs {enabled}")
        secret_name = ("pg-app", "uri") if label == "production" else ("ch-cipherhorizon-database",
                                                                       "url")
        pods = [(w, d["spec"]["template"]["spec"]) for w, d in deployments.items()]
        pods += [("setup", j["spec"]["template"]["spec"]) for j in by_kind(docs, "Job")]
        pods += [("status test", p["spec"]) for p in by_kind(docs, "Pod")]
        check(f"{label}: a setup job and a test pod", len(pods) == len(deployments) + 2,
              [w for w, _ in pods])
        for w, spec in pods:
            (c,) = spec["containers"]
            env = env_of(c)
            if w in deployments:
                check(f"{label}: {w} runs its binary", c["command"] == [f"/usr/local/bin/{w}"],
                      c["command"])
                want = values.get("workers", {}).get(w, {}).get("replicas")
                if want is not None:
                    check(f"{label}: {w} replicas", deployments[w]["spec"]["replicas"] == want)
                check(f"{label}: {w} holds a rollout until a pod outlives its start",
                      deployments[w]["spec"].get("minReadySeconds", 0) >= 10)
                grace = spec["terminationGracePeriodSeconds"]
                want = (45 if (label, w) == ("production", "query-portfolio") else
                        120 if w.startswith("proj-") else 60 if w == "exit-triggers" else 30)
                check(f"{label}: {w} grace period", grace == want, grace)
            check(f"{label}: {w} image tagged with the appVersion",
                  c["image"].endswith(f":{version}"), c["image"])
            check(f"{label}: {w} mounts no service account token",
                  spec.get("automountServiceAccountToken") is False)
            sc, psc = c.get("securityContext", {}), spec.get("securityContext", {})
            check(f"{label}: {w} runs as a user, read-only, without capabilities",
                  psc.get("runAsNonRoot") is True and sc.get("readOnlyRootFilesystem") is True
                  and sc.get("allowPrivilegeEscalation") is False
                  and sc.get("capabilities", {}).get("drop") == ["ALL"], (psc, sc))
            if label == "production":
                tls_dir = "/etc/cipherhorizon/nats-tls"
                keys = [{"key": k, "path": k} for k in ("ca.crt", "tls.crt", "tls.key")]
                check(f"production: {w} mounts the NATS TLS Secret and the extra volumes",
                      spec.get("volumes") == [{"name": "nats-tls", "secret": {
                          "secretName": "nats-client", "items": keys}}]
                      + PRODUCTION["extraVolumes"]
                      and c.get("volumeMounts") == [{"name": "nats-tls", "mountPath": tls_dir,
                                                     "readOnly": True}]
                      + PRODUCTION["extraVolumeMounts"], spec)
                files = {k: env.get(k, {}).get("value") for k in
                         ("CH_NATS_CA_FILE", "CH_NATS_CERT_FILE", "CH_NATS_KEY_FILE")}
                check(f"production: {w} finds the NATS CA and client certificate", files == {
                    "CH_NATS_CA_FILE": f"{tls_dir}/ca.crt",
                    "CH_NATS_CERT_FILE": f"{tls_dir}/tls.crt",
                    "CH_NATS_KEY_FILE": f"{tls_dir}/tls.key"}, files)
                check(f"production: {w} keeps to the trading nodes",
                      spec.get("nodeSelector") == {"pool": "trading"}
                      and spec.get("tolerations") == PRODUCTION["tolerations"], spec)
            names = [e["name"] for e in c.get("env", [])]
            check(f"{label}: {w} sets each variable once", len(names) == len(set(names)), names)
            undocumented = set(env) - documented
            check(f"{label}: {w}'s variables are documented", not undocumented,
                  sorted(undocumented))
            uses_db = not w.startswith("cmd-")
            ref = env.get("CH_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
            if (label, w) == ("production", "query-portfolio"):
                check("production: a worker's extraEnv comes last (its read-only role)",
                      c["env"][-1]["valueFrom"]["secretKeyRef"]["name"] == "pg-readonly",
                      c["env"][-1])
            elif w == "setup" and label == "default":
                check("default: setup reads the hook copy of the database Secret",
                      ref == {"name": "ch-cipherhorizon-setup-database", "key": "url"}, ref)
            elif uses_db:
                check(f"{label}: {w} gets the database URL from the Secret",
                      (ref.get("name"), ref.get("key")) == secret_name, ref)
            else:
                check(f"{label}: command worker {w} gets no database URL",
                      "CH_DATABASE_URL" not in env and "CH_DB_POOL" not in env, sorted(env))
            nats = env.get("CH_NATS_URL", {})
            want = ({"valueFrom": {"secretKeyRef": {"name": "nats-app", "key": "url"}}}
                    if label == "production" else {"value": "nats://nats:4222"})
            check(f"{label}: {w}'s NATS URL", {k: v for k, v in nats.items() if k != "name"}
                  == want, nats)
            for name, e in env.items():
                v = e.get("value")
                check(f"{label}: {w} {name} has no float notation",
                      v is None or not re.fullmatch(r"[0-9.]+e[+-][0-9]+", v), v)
            if label == "production":
                expect = {"CH_SYNC": "adaptive", "CH_SUBJECT_PREFIX": "prod",
                          "CH_REPLAY_BATCH_MAX": "1000000", "CH_BATCH_WAIT_MS": "2",
                          "CH_WORKER_THREADS": "2" if w == "cmd-signal" else "1",
                          "CH_LOG_FORMAT": "json"}
                if uses_db:
                    expect.update(CH_DB_SCHEMA="prod", CH_DB_POOL="4")
                got = {k: env.get(k, {}).get("value") for k in expect}
                if w == "cmd-signal":
                    got["CH_LOG_FORMAT"] = c["env"][-1]["value"] if c["env"][-1]["name"] == \
                        "CH_LOG_FORMAT" else None
                    expect["CH_LOG_FORMAT"] = "text"
                check(f"production: {w}'s variables from the values", got == expect, got)
            else:
                check(f"default: {w} leaves CH_BATCH_WAIT_MS to CH_SYNC",
                      "CH_BATCH_WAIT_MS" not in env)

        (test_pod,) = by_kind(docs, "Pod")
        skip = sorted(set(workers) - set(enabled) | {w for w in enabled if
                      values.get("workers", {}).get(w, {}).get("replicas") == 0})
        want = ["/usr/local/bin/chctl", "status"] + (["--skip", ",".join(skip)] if skip else [])
        check(f"{label}: helm test runs chctl status, skipping what does not run",
              test_pod["spec"]["containers"][0]["command"] == want,
              test_pod["spec"]["containers"][0]["command"])

        jobs = by_kind(docs, "Job")
        secrets = by_kind(docs, "Secret")
        hook = lambda d: d["metadata"].get("annotations", {})
        if jobs:
            (job,) = jobs
            c = job["spec"]["template"]["spec"]["containers"][0]
            check(f"{label}: setup job runs chctl setup",
                  c["command"] == ["/usr/local/bin/chctl", "setup"], c["command"])
            check(f"{label}: setup job is a pre-install/pre-upgrade hook",
                  hook(job).get("helm.sh/hook") == "pre-install,pre-upgrade", hook(job))
            replicas = env_of(c).get("CH_STREAM_REPLICAS", {}).get("value")
            check(f"{label}: setup job's stream replicas", replicas ==
                  ("3" if label == "production" else "1"), replicas)
        if label == "production":
            check("production: no Secret made when existingSecret is given", not secrets,
                  [s["metadata"]["name"] for s in secrets])
        else:
            url = "postgres://postgres@postgres:5432/cipherhorizon"
            release = [s for s in secrets if "helm.sh/hook" not in hook(s)]
            copies = [s for s in secrets if "helm.sh/hook" in hook(s)]
            check("default: the workers' Secret is the release's (not a hook), with database.url",
                  [(s["metadata"]["name"], s["stringData"]["url"]) for s in release]
                  == [("ch-cipherhorizon-database", url)], release)
            check("default: the setup job's copy is made before the job and then deleted",
                  len(copies) == 1 and copies[0]["stringData"]["url"] == url
                  and int(hook(copies[0])["helm.sh/hook-weight"])
                  < int(hook(jobs[0])["helm.sh/hook-weight"])
                  and hook(copies[0])["helm.sh/hook"] == hook(jobs[0])["helm.sh/hook"]
                  and "hook-succeeded" in hook(copies[0])["helm.sh/hook-delete-policy"],
                  [hook(s) for s in copies])

    print(f"helm chart: {passed} passed" + (f", {failed} failed" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
