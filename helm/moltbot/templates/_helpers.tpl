{{/* Name of a component's objects: <release>-<component>. */}}
{{- define "moltbot.name" -}}
{{- printf "%s-%s" .root.Release.Name .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object of a component. */}}
{{- define "moltbot.labels" -}}
app.kubernetes.io/name: moltbot
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* Selector labels of a component. */}}
{{- define "moltbot.selector" -}}
app.kubernetes.io/name: moltbot
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image of a component: <registry>/<image>:<tag>. */}}
{{- define "moltbot.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .image (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{/* Environment shared by every container: telemetry and the secrets. */}}
{{- define "moltbot.commonEnv" -}}
- name: RUST_LOG
  value: {{ .root.Values.telemetry.logLevel | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "moltbot-%s" .component | quote }}
# After SIGTERM: NOT_SERVING (gateway: /readyz 503) for the drain delay
# while endpoints and clients' resolvers drop the pod, then close.
- name: MOLTBOT_DRAIN_DELAY_MS
  value: {{ .root.Values.drain.delayMs | quote }}
- name: MOLTBOT_SHUTDOWN_GRACE_MS
  value: {{ .root.Values.drain.graceMs | quote }}
- name: MOLTBOT_RESOLVE_INTERVAL_MS
  value: {{ .root.Values.drain.resolveIntervalMs | quote }}
{{- with .root.Values.telemetry.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- range $key := .secretKeys }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $.root.Values.secrets.existingSecret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end -}}

{{/* URL of a service for its callers: its headless Service, whose name
     resolves to every ready pod, so each client balances over all of them
     (services/runtime/src/grpc/balance/); https:// under mesh TLS. */}}
{{- define "moltbot.url" -}}
{{- printf "%s://%s-pods:%v" (ternary "https" "http" .root.Values.mesh.tls.enabled) (include "moltbot.name" .) (index .root.Values.services .component).grpcPort -}}
{{- end -}}

{{/* The mesh-TLS environment of a component (its cert-manager secret is
     mounted at /var/run/moltbot/tls), or the plaintext opt-out. */}}
{{- define "moltbot.tlsEnv" -}}
{{- if .root.Values.mesh.tls.enabled }}
- name: MOLTBOT_TLS_CERT
  value: /var/run/moltbot/tls/tls.crt
- name: MOLTBOT_TLS_KEY
  value: /var/run/moltbot/tls/tls.key
- name: MOLTBOT_TLS_CA
  value: /var/run/moltbot/tls/ca.crt
{{- else }}
- name: MOLTBOT_INSECURE_PLAINTEXT
  value: "true"
{{- end }}
{{- end -}}

{{/* Pod termination budget: drain delay, then the grace for calls in
     flight, plus 5 s of margin before SIGKILL. */}}
{{- define "moltbot.terminationGrace" -}}
{{- add (div (add .Values.drain.delayMs .Values.drain.graceMs) 1000) 5 -}}
{{- end -}}
