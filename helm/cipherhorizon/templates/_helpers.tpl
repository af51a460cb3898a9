{{/* Names, labels and the environment every pod of the chart shares. */}}

{{- define "cipherhorizon.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: the release name when it already holds the chart's. */}}
{{- define "cipherhorizon.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
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
The environment of one pod: the variables README's Configuration lists, from the values, then
`env` (every pod), then the worker's own `env`, later ones winning; CH_NATS_URL from
nats.existingSecret when one is named. With "database" true, also CH_DATABASE_URL from the
Secret (unless an `env` sets it), CH_DB_SCHEMA and CH_DB_POOL.
Called with (dict "root" $ "env" <the worker's env or nil> "database" <bool> "extra" <dict or nil>).
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
{{- if .database -}}
{{- $_ := set $env "CH_DB_SCHEMA" $v.database.schema -}}
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
{{- if and $v.nats.existingSecret (not (hasKey $env "CH_NATS_URL")) }}
- name: CH_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.nats.existingSecret }}
      key: {{ $v.nats.existingSecretKey }}
{{- end }}
{{- if and .database (not (hasKey $env "CH_DATABASE_URL")) }}
- name: CH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "cipherhorizon.databaseSecret" .root }}
      key: {{ include "cipherhorizon.databaseSecretKey" .root }}
{{- end }}
{{- range $k, $x := $env }}
{{- if not (kindIs "invalid" $x) }}
- name: {{ $k }}
  value: {{ include "cipherhorizon.text" $x | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level settings every pod shares. */}}
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
{{- end -}}
