{{/* Names, labels and the environment every pod of the chart shares. */}}

{{- define "cipherhorizon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object's name: fullnameOverride, or the release name (with the chart's
name unless it holds it already). At most 40 characters, so that a worker's name after it
stays within 63; a longer one is cut to 33 and told apart by 6 characters of its hash (two
long release names that share their first 40 characters would collide otherwise).
*/}}
{{- define "cipherhorizon.fullname" -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- $full := .Values.fullnameOverride -}}
{{- if not $full -}}
{{- $full = ternary .Release.Name (printf "%s-%s" .Release.Name $name) (contains $name .Release.Name) -}}
{{- end -}}
{{- if gt (len $full) 40 -}}
{{- printf "%s-%s" ($full | trunc 33 | trimSuffix "-") ($full | sha256sum | trunc 6) -}}
{{- else -}}
{{- $full | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cipherhorizon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cipherhorizon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cipherhorizon.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cipherhorizon.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cipherhorizon
{{- end -}}

{{- define "cipherhorizon.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "cipherhorizon.databaseSecret" -}}
{{- default (printf "%s-database" (include "cipherhorizon.fullname" .)) .Values.database.existingSecret -}}
{{- end -}}

{{/* The setup job's copy of the chart's database Secret: a hook, made before the job. */}}
{{- define "cipherhorizon.setupDatabaseSecret" -}}
{{- default (printf "%s-setup-database" (include "cipherhorizon.fullname" .)) .Values.database.existingSecret -}}
{{- end -}}

{{/* CH_DB_SCHEMA: as given, or `public` for the prefix `ch`, else the prefix lower-cased, `-` as `_`. */}}
{{- define "cipherhorizon.dbSchema" -}}
{{- if .Values.database.schema -}}
{{- .Values.database.schema -}}
{{- else if eq .Values.nats.subjectPrefix "ch" -}}
public
{{- else -}}
{{- $schema := .Values.nats.subjectPrefix | lower | replace "-" "_" -}}
{{- if hasPrefix "pg_" $schema -}}
{{- fail (printf "nats.subjectPrefix %q makes the schema %q, and PostgreSQL reserves names beginning with pg_: set database.schema" .Values.nats.subjectPrefix $schema) -}}
{{- end -}}
{{- $schema -}}
{{- end -}}
{{- end -}}

{{- define "cipherhorizon.databaseSecretKey" -}}
{{- if .Values.database.existingSecret -}}{{ .Values.database.existingSecretKey }}{{- else -}}url{{- end -}}
{{- end -}}

{{/*
A value as an environment variable's text. Helm may read a whole number of the values as a
float, which prints as 1e+06: whole floats are printed as integers.
*/}}
{{- define "cipherhorizon.text" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/*
Fails the install when a variable the workers would refuse reaches a pod through `env` or
`extraEnv` (the values' own settings are the schema's to check): the ranges and names of
README's Configuration, CH_DB_POOL from "poolMin" (default 2, as database.pool: a projector
needs 2; 1 for the workers that need no lock). With "grace" (a command worker's
terminationGracePeriodSeconds) and CH_SYNC=immediate, the wait's bound must leave 10 s of the
grace period to answer the requests a stopping worker holds; with "queryGrace" (a query
worker's), the longest query (CH_QUERY_TIMEOUT_MS, 11 s of `min_stream_seq` wait) must leave
5 s. Called with (dict "env" <name -> text> "who" <the pod, for the message> "grace" <seconds
or nil> "queryGrace" <seconds or nil> "poolMin" <1 or 2>).
*/}}
{{- define "cipherhorizon.checkEnv" -}}
{{- $env := .env -}}
{{- $ranges := dict
  "CH_BATCH_MAX" (list 1 10000)
  "CH_REPLAY_BATCH_MAX" (list 1 1000000)
  "CH_BATCH_WAIT_MS" (list 0 60000)
  "CH_IMMEDIATE_TIMEOUT_MS" (list 0 60000)
  "CH_QUERY_TIMEOUT_MS" (list 100 600000)
  "CH_WORKER_THREADS" (list 1 256)
  "CH_DB_POOL" (list (default 2 .poolMin) 256) -}}
{{- range $k, $r := $ranges -}}
{{- if hasKey $env $k -}}
{{- $x := get $env $k -}}
{{- if or (not (regexMatch "^[0-9]{1,9}$" $x)) (lt (atoi $x) (index $r 0)) (gt (atoi $x) (index $r 1)) -}}
{{- fail (printf "%s: %s=%q: the workers take a whole number from %d to %d" $.who $k $x (index $r 0) (index $r 1)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $enums := dict "CH_SYNC" (list "eventual" "batch" "immediate" "adaptive") "CH_LOG_FORMAT" (list "text" "json") -}}
{{- range $k, $allowed := $enums -}}
{{- if and (hasKey $env $k) (not (has (get $env $k) $allowed)) -}}
{{- fail (printf "%s: %s=%q: the workers take %s" $.who $k (get $env $k) (join ", " $allowed)) -}}
{{- end -}}
{{- end -}}
{{- if and .grace (eq (get $env "CH_SYNC") "immediate") (hasKey $env "CH_IMMEDIATE_TIMEOUT_MS") -}}
{{- $bound := atoi (get $env "CH_IMMEDIATE_TIMEOUT_MS") -}}
{{- if gt (add $bound 10000) (mul (int .grace) 1000) -}}
{{- fail (printf "%s: CH_IMMEDIATE_TIMEOUT_MS=%d leaves less than 10 s of its terminationGracePeriodSeconds (%d) to answer the commands a stopping worker holds: lower the bound or raise the grace period" $.who $bound (int .grace)) -}}
{{- end -}}
{{- end -}}
{{- if .queryGrace -}}
{{- $read := atoi (default "10000" (get $env "CH_QUERY_TIMEOUT_MS")) -}}
{{- if gt (add $read 16000) (mul (int .queryGrace) 1000) -}}
{{- fail (printf "%s: CH_QUERY_TIMEOUT_MS=%d, with 11 s of min_stream_seq wait, leaves less than 5 s of its terminationGracePeriodSeconds (%d) to answer the queries a stopping worker holds: lower the bound or raise the grace period" $.who $read (int .queryGrace)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The environment of one pod: the variables README's Configuration lists, from the values, then
`env` (every pod), then the worker's own `env`, later ones winning; CH_NATS_URL from
nats.existingSecret when one is named. With "database" true, also CH_DATABASE_URL from the
Secret "secret" (unless an `env` sets it), CH_DB_SCHEMA and CH_DB_POOL. Then `extraEnv` and the
worker's own "extraEnv", as written, in place of the chart's variables of the same names.
Called with (dict "root" $ "env" <the worker's env> "extraEnv" <the worker's extraEnv>
"database" <bool> "secret" <the database Secret's name> "extra" <dict> "who" <the pod, for
messages> "grace" <a command worker's grace period> "queryGrace" <a query worker's>
"poolMin" <its least CH_DB_POOL>), all but root optional; the result is checked by
cipherhorizon.checkEnv.
*/}}
{{- define "cipherhorizon.env" -}}
{{- $v := .root.Values -}}
{{- $env := dict
  "CH_SUBJECT_PREFIX" $v.nats.subjectPrefix
  "CH_SYNC" $v.sync.mode
  "CH_BATCH_MAX" $v.sync.batchMax
  "CH_IMMEDIATE_TIMEOUT_MS" $v.sync.immediateTimeoutMs
  "CH_REPLAY_BATCH_MAX" $v.sync.replayBatchMax
  "CH_LOG_FORMAT" $v.log.format
  "RUST_LOG" $v.log.level -}}
{{- if not (kindIs "invalid" $v.sync.batchWaitMs) -}}
{{- $_ := set $env "CH_BATCH_WAIT_MS" $v.sync.batchWaitMs -}}
{{- end -}}
{{- if not $v.nats.existingSecret -}}
{{- $_ := set $env "CH_NATS_URL" $v.nats.url -}}
{{- end -}}
{{- with $v.nats.tls }}{{ if .existingSecret -}}
{{- if .caKey -}}
{{- $_ := set $env "CH_NATS_CA_FILE" (printf "%s/%s" (include "cipherhorizon.natsTlsDir" $) .caKey) -}}
{{- end -}}
{{- if .certKey -}}
{{- $_ := set $env "CH_NATS_CERT_FILE" (printf "%s/%s" (include "cipherhorizon.natsTlsDir" $) .certKey) -}}
{{- $_ := set $env "CH_NATS_KEY_FILE" (printf "%s/%s" (include "cipherhorizon.natsTlsDir" $) .keyKey) -}}
{{- end -}}
{{- end }}{{ end -}}
{{- if .database -}}
{{- $_ := set $env "CH_DB_SCHEMA" (include "cipherhorizon.dbSchema" .root) -}}
{{- $_ := set $env "CH_DB_POOL" $v.database.pool -}}
{{- end -}}
{{- range $k, $x := (default dict .extra) -}}
{{- $_ := set $env $k $x -}}
{{- end -}}
{{- range $k, $x := (default dict $v.env) -}}
{{- $_ := set $env $k $x -}}
{{- end -}}
{{- range $k, $x := (default dict .env) -}}
{{- $_ := set $env $k $x -}}
{{- end -}}
{{- /* extraEnv: the chart's list, then the worker's; the worker's entry wins a name. */ -}}
{{- $own := default list .extraEnv -}}
{{- $ownNames := dict -}}
{{- range $own -}}
{{- $_ := set $ownNames .name true -}}
{{- end -}}
{{- $extraEnv := list -}}
{{- range (default list $v.extraEnv) -}}
{{- if not (hasKey $ownNames .name) -}}
{{- $extraEnv = append $extraEnv . -}}
{{- end -}}
{{- end -}}
{{- $extraEnv = concat $extraEnv $own -}}
{{- $taken := dict -}}
{{- range $extraEnv -}}
{{- $_ := set $taken .name true -}}
{{- end -}}
{{- /* What the pod will see of the variables the chart knows, checked as the workers check them. */ -}}
{{- $seen := dict -}}
{{- range $k, $x := $env -}}
{{- if not (or (kindIs "invalid" $x) (hasKey $taken $k)) -}}
{{- $_ := set $seen $k (include "cipherhorizon.text" $x) -}}
{{- end -}}
{{- end -}}
{{- range $extraEnv -}}
{{- if hasKey . "value" -}}
{{- $_ := set $seen .name (toString .value) -}}
{{- end -}}
{{- end -}}
{{- /* The chart-wide `env` and `extraEnv` first, so that their faults are named as theirs. */ -}}
{{- $shared := dict -}}
{{- range $k, $x := (default dict $v.env) -}}
{{- if not (kindIs "invalid" $x) -}}
{{- $_ := set $shared $k (include "cipherhorizon.text" $x) -}}
{{- end -}}
{{- end -}}
{{- range (default list $v.extraEnv) -}}
{{- if hasKey . "value" -}}
{{- $_ := set $shared .name (toString .value) -}}
{{- end -}}
{{- end -}}
{{- include "cipherhorizon.checkEnv" (dict "env" $shared "who" "env or extraEnv (every pod)") -}}
{{- include "cipherhorizon.checkEnv" (dict "env" $seen "who" (default "a pod" .who) "grace" .grace "queryGrace" .queryGrace "poolMin" .poolMin) -}}
{{- if and $v.nats.existingSecret (not (hasKey $env "CH_NATS_URL")) (not (hasKey $taken "CH_NATS_URL")) }}
- name: CH_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.nats.existingSecret }}
      key: {{ $v.nats.existingSecretKey }}
{{- end }}
{{- if and .database (not (hasKey $env "CH_DATABASE_URL")) (not (hasKey $taken "CH_DATABASE_URL")) }}
- name: CH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "cipherhorizon.databaseSecret" .root) .secret }}
      key: {{ include "cipherhorizon.databaseSecretKey" .root }}
{{- end }}
{{- range $k, $x := $env }}
{{- if and (not (kindIs "invalid" $x)) (not (hasKey $taken $k)) }}
- name: {{ $k }}
  value: {{ include "cipherhorizon.text" $x | quote }}
{{- end }}
{{- end }}
{{- with $extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level settings every pod shares (scheduling: see cipherhorizon.scheduling). */}}
{{- define "cipherhorizon.podSpec" -}}
automountServiceAccountToken: false
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $volumes := default list .Values.extraVolumes -}}
{{- with .Values.nats.tls -}}
{{- if .existingSecret -}}
{{- /* Only the keys in use, each named: a Secret without one fails the mount, saying which. */ -}}
{{- $items := list -}}
{{- if .caKey -}}
{{- $items = append $items (dict "key" .caKey "path" .caKey) -}}
{{- end -}}
{{- if .certKey -}}
{{- $items = append $items (dict "key" .certKey "path" .certKey) -}}
{{- $items = append $items (dict "key" .keyKey "path" .keyKey) -}}
{{- end -}}
{{- $volumes = prepend $volumes (dict "name" "nats-tls" "secret" (dict "secretName" .existingSecret "items" $items)) -}}
{{- end -}}
{{- end -}}
{{- with $volumes }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Where the NATS TLS Secret (nats.tls.existingSecret) is mounted. */}}
{{- define "cipherhorizon.natsTlsDir" -}}
/etc/cipherhorizon/nats-tls
{{- end -}}

{{/* Container-level settings every container shares: its security context and mounts. */}}
{{- define "cipherhorizon.containerExtras" -}}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $mounts := default list .Values.extraVolumeMounts -}}
{{- if .Values.nats.tls.existingSecret -}}
{{- $mounts = prepend $mounts (dict "name" "nats-tls" "mountPath" (include "cipherhorizon.natsTlsDir" .) "readOnly" true) -}}
{{- end -}}
{{- with $mounts }}
volumeMounts:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Where a pod may run: the worker's own nodeSelector, tolerations and affinity, else the
chart's. Called with (dict "root" $ "worker" <the worker's values, or nil>).
*/}}
{{- define "cipherhorizon.scheduling" -}}
{{- $w := default dict .worker -}}
{{- $v := .root.Values -}}
{{- with (ternary $w.nodeSelector $v.nodeSelector (hasKey $w "nodeSelector")) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (ternary $w.tolerations $v.tolerations (hasKey $w "tolerations")) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (ternary $w.affinity $v.affinity (hasKey $w "affinity")) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
A pod's labels and annotations: the chart's labels with the component, then podLabels (the
schema keeps them off the chart's own names); podAnnotations under the worker's own
("annotations"), and "extra" ones (a checksum, hooks) over both.
Called with (dict "root" $ "component" <name> "annotations" <dict> "extra" <dict>).
*/}}
{{- define "cipherhorizon.podMetadata" -}}
labels:
  {{- include "cipherhorizon.labels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with (merge (dict) (default dict .extra) (default dict .annotations) (default dict .root.Values.podAnnotations)) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The Postgres connections the release's workers may open: pool per pod that uses it (a
    projector's lock session is one of its pool's), counting the pods a rolling update starts
    before it stops old ones (maxSurge 25 %, rounded up: one for up to 4 replicas). */}}
{{- define "cipherhorizon.connections" -}}
{{- $n := 0 -}}
{{- range $name, $w := .Values.workers -}}
{{- if and $w.enabled (not (hasPrefix "cmd-" $name)) -}}
{{- $global := default $.Values.database.pool (get (default dict $.Values.env) "CH_DB_POOL") -}}
{{- $pool := default $global (get (default dict $w.env) "CH_DB_POOL") -}}
{{- /* A `value` in extraEnv wins, the worker's over the chart's (one from a Secret is not known here). */ -}}
{{- range (concat (default list $.Values.extraEnv) (default list $w.extraEnv)) -}}
{{- if and (eq .name "CH_DB_POOL") (hasKey . "value") -}}
{{- $pool = .value -}}
{{- end -}}
{{- end -}}
{{- $pool = int $pool -}}
{{- $pods := add (int $w.replicas) (div (add (int $w.replicas) 3) 4) -}}
{{- $n = add $n (mul $pods $pool) -}}
{{- end -}}
{{- end -}}
{{- $n -}}
{{- end -}}
