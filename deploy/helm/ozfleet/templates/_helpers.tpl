{{/* Names: the reference chart's rules. */}}
{{- define "ozfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ozfleet.fullname" -}}
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

{{/* A component's name: <fullname>-<component>, within 63 characters. */}}
{{- define "ozfleet.component" -}}
{{- printf "%s-%s" (include "ozfleet.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "ozfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ozfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ozfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ozfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ozfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{- define "ozfleet.workerId" -}}
{{- required "worker.workerId is required: the worker id Oz routes runs to (config.worker_host)" .Values.worker.workerId -}}
{{- end -}}

{{- define "ozfleet.apiKeySecretName" -}}
{{- if .Values.warp.apiKeySecret.create -}}
{{- default (include "ozfleet.component" (dict "root" . "component" "warp-api-key")) .Values.warp.apiKeySecret.name -}}
{{- else -}}
{{- required "warp.apiKeySecret.name is required when warp.apiKeySecret.create is false: the name of an existing Secret holding the Oz API key" .Values.warp.apiKeySecret.name -}}
{{- end -}}
{{- end -}}

{{- define "ozfleet.joinTokenSecretName" -}}
{{- if .Values.joinToken.create -}}
{{- default (include "ozfleet.component" (dict "root" . "component" "join-token")) .Values.joinToken.name -}}
{{- else -}}
{{- required "joinToken.name is required when joinToken.create is false: the name of an existing Secret holding the join token" .Values.joinToken.name -}}
{{- end -}}
{{- end -}}

{{- define "ozfleet.adminTokenSecretName" -}}
{{- $token := .Values.gateway.admin.token -}}
{{- if $token.create -}}
{{- default (include "ozfleet.component" (dict "root" . "component" "admin-token")) $token.name -}}
{{- else -}}
{{- required "gateway.admin.token.name is required when gateway.admin.token.create is false" $token.name -}}
{{- end -}}
{{- end -}}

{{- define "ozfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ozfleet.component" (dict "root" . "component" "kubernetes-agent")) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ozfleet.taskNamespace" -}}
{{- default .Release.Namespace .Values.kubernetesBackend.namespace -}}
{{- end -}}

{{/* The address node agents dial: the gateway Service unless set. */}}
{{- define "ozfleet.gatewayAddress" -}}
{{- if .address -}}
{{- .address -}}
{{- else -}}
{{- printf "%s://%s.%s.svc:%v" (ternary "https" "http" .root.Values.gateway.tls.enabled) (include "ozfleet.component" (dict "root" .root "component" "gateway")) .root.Release.Namespace .root.Values.gateway.service.port -}}
{{- end -}}
{{- end -}}

{{- define "ozfleet.podNetwork" -}}
{{- if .Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Checksums of what the pods read: a change rolls them. */}}
{{- define "ozfleet.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secrets.yaml") . | sha256sum }}
{{- end -}}

{{/* The probe of a gateway health service, unless the values give a handler. */}}
{{- define "ozfleet.healthProbe" -}}
{{- $probe := .probe -}}
{{- if not (or $probe.exec $probe.httpGet $probe.tcpSocket $probe.grpc) }}
exec:
  command:
    - /usr/local/bin/ozfleet
    - health
    - --address=127.0.0.1:{{ .root.Values.gateway.admin.port }}
    - --service={{ .service }}
    - --timeout={{ max 1 (sub (int (default 5 $probe.timeoutSeconds)) 1) }}
{{- end }}
{{ toYaml $probe }}
{{- end -}}
