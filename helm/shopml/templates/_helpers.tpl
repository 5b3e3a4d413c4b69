{{/*
Names
*/}}
{{- define "shopml.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shopml.fullname" -}}
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

{{/* <fullname>-<component>, within the 63-character name limit. */}}
{{- define "shopml.componentName" -}}
{{- $prefix := include "shopml.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix .component }}
{{- end }}

{{- define "shopml.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shopml.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shopml.sparkServiceAccountName" -}}
{{- if .Values.spark.kubernetes.serviceAccount.create }}
{{- default (include "shopml.componentName" (dict "root" . "component" "spark")) .Values.spark.kubernetes.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.spark.kubernetes.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shopml.stateClaimName" -}}
{{- default (include "shopml.componentName" (dict "root" . "component" "state")) .Values.persistence.existingClaim }}
{{- end }}

{{/*
Labels. `component` is passed with the root context: include "shopml.labels" (dict "root" . "component" "serving")
*/}}
{{- define "shopml.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shopml.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "shopml.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "shopml.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: shopml
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "shopml.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
In-cluster URLs and connection strings (never with a password in them).
*/}}
{{- define "shopml.mlflowHost" -}}
{{- printf "%s.%s.svc.%s" (include "shopml.componentName" (dict "root" . "component" "mlflow")) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "shopml.mlflowTrackingUri" -}}
{{- if .Values.shopml.mlflowTrackingUri }}
{{- .Values.shopml.mlflowTrackingUri }}
{{- else if .Values.mlflow.enabled }}
{{- printf "http://%s:%d" (include "shopml.mlflowHost" .) (int .Values.mlflow.service.port) }}
{{- else }}
{{- fail "mlflow.enabled=false needs shopml.mlflowTrackingUri (the tracking server ShopML logs to)" }}
{{- end }}
{{- end }}

{{/* SQLAlchemy URL of a database on the PostgreSQL server; the password comes from PGPASSWORD. */}}
{{- define "shopml.postgresUrl" -}}
{{- $pg := .root.Values.postgres }}
{{- printf "postgresql+psycopg2://%s@%s:%d/%s?sslmode=%s" $pg.user $pg.host (int $pg.port) .database $pg.sslmode }}
{{- end }}

{{/* Feast Redis connection string; the password is expanded by the kubelet from SHOPML_REDIS_PASSWORD. */}}
{{- define "shopml.redisConnection" -}}
{{- $r := .Values.redis }}
{{- $parts := list (printf "%s:%d" $r.host (int $r.port)) (printf "db=%d" (int $r.db)) }}
{{- if $r.ssl }}{{ $parts = append $parts "ssl=true" }}{{ end }}
{{- if $r.existingSecret }}{{ $parts = append $parts "password=$(SHOPML_REDIS_PASSWORD)" }}{{ end }}
{{- join "," $parts }}
{{- end }}

{{/*
Environment of every ShopML container: the profile ConfigMap (envFrom), then "shopml.env":
passwords and the user-id key from the existing Secrets and what is built from them. Kubernetes expands $(VAR)
from variables defined before, so the Redis connection string gets its password without the
chart ever seeing it. HOME points at the writable /tmp (the root filesystem is read-only).
*/}}
{{- define "shopml.envFrom" -}}
- configMapRef:
    name: {{ include "shopml.componentName" (dict "root" . "component" "profile") }}
{{- end }}

{{- define "shopml.env" -}}
{{- if .Values.postgres.existingSecret }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.postgres.existingSecret }}
      key: {{ .Values.postgres.passwordKey }}
{{- end }}
{{- if .Values.redis.existingSecret }}
- name: SHOPML_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.passwordKey }}
{{- end }}
- name: SHOPML_PRIVACY__KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.privacy.existingSecret }}
      key: {{ .Values.privacy.secretKey }}
- name: SHOPML_FEAST__REDIS_CONNECTION
  value: {{ include "shopml.redisConnection" . | quote }}
- name: SHOPML_FEAST_REDIS
  value: $(SHOPML_FEAST__REDIS_CONNECTION)
- name: HOME
  value: /tmp
{{- end }}

{{/*
Security contexts: non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp,
read-only root filesystem.
*/}}
{{- define "shopml.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "shopml.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "shopml.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Rolls pods when the profile or Spark configuration changes. */}}
{{- define "shopml.configChecksum" -}}
checksum/profile: {{ include (print .Template.BasePath "/configmap-profile.yaml") . | sha256sum }}
{{- end }}

{{/* The state volume: the shared PVC, or an emptyDir when persistence is disabled. */}}
{{- define "shopml.stateVolume" -}}
- name: state
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "shopml.stateClaimName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
