{{/* Names and labels shared by every template. */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the operator pod; never change them between releases (Deployment selectors are immutable). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels on every object of the chart. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.trainerImage" -}}
{{- default (printf "ghcr.io/kubetune/kubetune-trainer:%s" .Chart.AppVersion) .Values.trainer.image -}}
{{- end -}}

{{/*
The operator's namespaced permissions: one list of rules, used by the ClusterRole in cluster mode and by the
Role in each watched namespace in namespaced mode. Each rule names what the operator does with it.
*/}}
{{- define "kubetune.namespacedRules" -}}
# FineTuneJobs: watch them; patch only to lift the finalizer earlier versions put on each job.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Their status: phase, conditions, progress, adapter.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# The PyTorchJob that runs each FineTuneJob: created, adopted, suspended and resumed.
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Kueue's Workload of a job that names a LocalQueue: read for Kueue's wait message, patched (spec.active)
# to suspend and resume it. Without Kueue installed these rules grant nothing.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "patch"]
# The rendered trainer config of each job (never credentials: those stay in Secrets the operator cannot read).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
# Events on FineTuneJobs (core/v1, as `kubectl describe` shows them).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Trainer pods, read only: their termination message carries the failure reason.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- end -}}
