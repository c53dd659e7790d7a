{{/* Chart name, truncated to the 63-character DNS label limit. */}}
{{- define "mcp-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "mcp-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mcp-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change for the life of a release: used in selectors. */}}
{{- define "mcp-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mcp-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mcp-gateway.labels" -}}
helm.sh/chart: {{ include "mcp-gateway.chart" . }}
{{ include "mcp-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mcp-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mcp-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mcp-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Fixed in-container paths; the Dockerfile's CMD uses the same config path. */}}
{{- define "mcp-gateway.configPath" -}}/etc/mcp-gateway/config.yaml{{- end }}
{{- define "mcp-gateway.signingKeyDir" -}}/etc/mcp-gateway/signing-key{{- end }}
{{- define "mcp-gateway.signingKeyPath" -}}/etc/mcp-gateway/signing-key/signing-key.pem{{- end }}

{{/* The port serving /metrics: metrics.port, or the main HTTP port when it is unset. */}}
{{- define "mcp-gateway.metricsPort" -}}
{{- if .Values.metrics.port }}{{ int .Values.metrics.port }}{{ else }}{{ int .Values.containerPort }}{{ end }}
{{- end }}

{{/* "true" when metrics are served on their own port, else empty. */}}
{{- define "mcp-gateway.separateMetricsPort" -}}
{{- if ne (include "mcp-gateway.metricsPort" .) (toString (int .Values.containerPort)) }}true{{ end }}
{{- end }}

{{/*
The number of gateway processes in the pod (`serve --workers N`): workers, or for "auto" the CPU limit
rounded up (1 without a limit). Computed here, not by the gateway's own `--workers auto`, because every
worker serves its own /metrics port and the ports, Service and monitors must list them all.
*/}}
{{- define "mcp-gateway.workers" -}}
{{- if eq (toString .Values.workers) "auto" }}
{{- $cpu := toString (((.Values.resources | default dict).limits | default dict).cpu | default "") }}
{{- if not $cpu }}1
{{- else if hasSuffix "m" $cpu }}{{ max 1 (int (ceil (divf (float64 (trimSuffix "m" $cpu)) 1000))) }}
{{- else }}{{ max 1 (int (ceil (float64 $cpu))) }}
{{- end }}
{{- else }}{{ int .Values.workers }}
{{- end }}
{{- end }}

{{/* The name of worker $'s metrics port: metrics, metrics-1, metrics-2, ... */}}
{{- define "mcp-gateway.workerMetricsPortName" -}}
{{- if eq (int .) 0 }}metrics{{ else }}metrics-{{ . }}{{ end }}
{{- end }}

{{/* The named container/Service port that serves /metrics. */}}
{{- define "mcp-gateway.metricsPortName" -}}
{{- if include "mcp-gateway.separateMetricsPort" . }}metrics{{ else }}http{{ end }}
{{- end }}

{{/*
The gateway configuration file. The chart owns the keys that must agree with the pod spec:
`listen` (the container port), `metrics_listen` (only when metrics have their own port),
`shutdown_grace_seconds` (shutdownGracePeriodSeconds, which terminationGracePeriodSeconds covers),
`logging.format` (logFormat) and, when signingKey.existingSecret is set,
authorization.signing_key_file (the mounted Secret).
*/}}
{{- define "mcp-gateway.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $_ := set $config "listen" (printf "0.0.0.0:%d" (int .Values.containerPort)) }}
{{- $_ := set $config "shutdown_grace_seconds" (int .Values.shutdownGracePeriodSeconds) }}
{{- $_ := set $config "logging" (dict "format" .Values.logFormat) }}
{{- if include "mcp-gateway.separateMetricsPort" . }}
{{- $_ := set $config "metrics_listen" (printf "0.0.0.0:%s" (include "mcp-gateway.metricsPort" .)) }}
{{- else }}
{{- $_ := unset $config "metrics_listen" }}
{{- end }}
{{- if .Values.signingKey.existingSecret }}
{{- $authorization := deepCopy (get $config "authorization" | default dict) }}
{{- $_ := set $authorization "signing_key_file" (include "mcp-gateway.signingKeyPath" .) }}
{{- if .Values.signingKey.previousKey }}
{{- $_ := set $authorization "previous_signing_key_files" (list (printf "%s/previous-signing-key.pem" (include "mcp-gateway.signingKeyDir" .))) }}
{{- end }}
{{- $_ := set $config "authorization" $authorization }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* True when tokens are signed with a key shared by every pod (chart-mounted or user-mounted). */}}
{{- define "mcp-gateway.hasSharedSigningKey" -}}
{{- $authorization := get (.Values.config | default dict) "authorization" | default dict }}
{{- if or .Values.signingKey.existingSecret (get $authorization "signing_key_file") }}true{{ end }}
{{- end }}

{{/* Environment variable names the pod defines, for the NOTES check of ${VAR} references. */}}
{{- define "mcp-gateway.envNames" -}}
{{- range $name, $_ := .Values.clientSecrets.env }}{{ $name }} {{ end }}
{{- range .Values.extraEnv }}{{ .name }} {{ end }}
{{- end }}

{{/* The host name of config.public_url (the default host of the Ingress and HTTPRoute). */}}
{{- define "mcp-gateway.publicHost" -}}
{{- (urlParse (get (.Values.config | default dict) "public_url" | default "")).hostname }}
{{- end }}

{{/* The issuer (authorization.issuer, else public_url), for the helm test's metadata check. */}}
{{- define "mcp-gateway.issuer" -}}
{{- $config := .Values.config | default dict }}
{{- get (get $config "authorization" | default dict) "issuer" | default (get $config "public_url") | trimSuffix "/" }}
{{- end }}

{{/* "true" when more than one pod may run: replicaCount > 1 or the HorizontalPodAutoscaler. */}}
{{- define "mcp-gateway.multiReplica" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/* config.replay_store as the gateway reads it: "memory" unless set. */}}
{{- define "mcp-gateway.replayStore" -}}
{{- get (.Values.config | default dict) "replay_store" | default "memory" }}
{{- end }}

{{/* "true" when a route uses the legacy HTTP+SSE transport (transport: sse). */}}
{{- define "mcp-gateway.hasLegacySseRoute" -}}
{{- range (get (.Values.config | default dict) "routes" | default list) }}
{{- if eq (get . "transport" | default "") "sse" }}true{{ end }}
{{- end }}
{{- end }}

{{/* Fail rendering on combinations that would deploy a gateway that cannot work. */}}
{{- define "mcp-gateway.validate" -}}
{{- $multi := include "mcp-gateway.multiReplica" . }}
{{- if and $multi (not (include "mcp-gateway.hasSharedSigningKey" .)) }}
{{- fail "signingKey.existingSecret is required with more than one replica (replicaCount > 1 or autoscaling.enabled): without a shared key each pod signs tokens the other pods reject" }}
{{- end }}
{{- if and $multi (eq (include "mcp-gateway.replayStore" .) "memory") (not .Values.acknowledgeInMemoryReplayStore) }}
{{- fail "config.replay_store must be a Redis URL shared by every pod with more than one replica (replicaCount > 1 or autoscaling.enabled): with the in-memory store an ID-JAG can be redeemed once per pod. Set config.replay_store (e.g. redis://:${REDIS_PASSWORD}@redis:6379/0), or acknowledgeInMemoryReplayStore: true to accept that risk" }}
{{- end }}
{{- if and $multi (include "mcp-gateway.hasLegacySseRoute" .) (not .Values.legacySseAffinity) }}
{{- fail "routes with transport: sse need session affinity with more than one replica (replicaCount > 1 or autoscaling.enabled): the legacy HTTP+SSE transport answers each POST on the client's GET stream, which lives in one pod. Set legacySseAffinity to ClientIP (the Service pins client addresses) or ingress (your ingress pins clients with a cookie or source hash), or run one replica" }}
{{- end }}
{{- $workers := int (include "mcp-gateway.workers" .) }}
{{- if gt $workers 1 }}
{{- if not (include "mcp-gateway.separateMetricsPort" .) }}
{{- fail (printf "metrics.port is required with %d workers (workers, or the CPU limit when workers is auto): each worker serves its own /metrics on metrics.port + its index; on the http port a scrape would show one worker's counters" $workers) }}
{{- end }}
{{- $metricsPort := int (include "mcp-gateway.metricsPort" .) }}
{{- if and (le $metricsPort (int .Values.containerPort)) (lt (int .Values.containerPort) (add $metricsPort $workers)) }}
{{- fail (printf "metrics.port %d to %d (one per worker) must not include containerPort %d" $metricsPort (add $metricsPort $workers -1) (int .Values.containerPort)) }}
{{- end }}
{{- if eq (include "mcp-gateway.replayStore" .) "memory" }}
{{- fail (printf "config.replay_store must be a Redis URL with %d workers (workers, or the CPU limit when workers is auto): with the in-memory store an ID-JAG can be redeemed once per worker. Set config.replay_store, or workers: 1" $workers) }}
{{- end }}
{{- if include "mcp-gateway.hasLegacySseRoute" . }}
{{- fail (printf "routes with transport: sse cannot be served by %d workers: the legacy HTTP+SSE transport answers each POST on the GET stream one worker holds. Set workers: 1 (and scale with replicas and legacySseAffinity)" $workers) }}
{{- end }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- $requests := (.Values.resources | default dict).requests | default dict }}
{{- if and .Values.autoscaling.targetCPUUtilizationPercentage (not $requests.cpu) }}
{{- fail "resources.requests.cpu is required with autoscaling.targetCPUUtilizationPercentage: the HPA's utilization is a share of the request" }}
{{- end }}
{{- if and .Values.autoscaling.targetMemoryUtilizationPercentage (not $requests.memory) }}
{{- fail "resources.requests.memory is required with autoscaling.targetMemoryUtilizationPercentage: the HPA's utilization is a share of the request" }}
{{- end }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "httpRoute.parentRefs is required when httpRoute.enabled: the Gateway(s) the route attaches to" }}
{{- end }}
{{- $audit := get (.Values.config | default dict) "audit" | default dict }}
{{- $telemetry := get (.Values.config | default dict) "telemetry" | default dict }}
{{- $sink := get $audit "sink" | default "stdout" }}
{{- if and (eq $sink "otlp") (not (get $telemetry "otlp_endpoint")) }}
{{- fail "config.audit.sink: otlp needs config.telemetry.otlp_endpoint: the OpenTelemetry receiver the audit records are sent to" }}
{{- else if not (has $sink (list "stdout" "otlp")) }}
{{- fail "config.audit.sink must be stdout or otlp in Kubernetes: the audit trail is collected with the pod's logs or sent to an OpenTelemetry receiver. The root filesystem is read-only; a file could only live in the small /tmp emptyDir, which the gateway does not rotate and would fill (evicting the pod)" }}
{{- end }}
{{- if and .Values.clientSecrets.env (not .Values.clientSecrets.existingSecret) }}
{{- fail "clientSecrets.existingSecret is required when clientSecrets.env is set" }}
{{- end }}
{{- end }}
