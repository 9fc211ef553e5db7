{{/*
coralline chart helpers: names, labels, images, the Redis URL, shared pod pieces.
*/}}

{{- define "coralline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "coralline.fullname" -}}
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

{{/* <fullname>-<component>, e.g. coralline-verifier */}}
{{- define "coralline.componentName" -}}
{{- printf "%s-%s" (include "coralline.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "coralline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* selector labels of one component: {root, component} */}}
{{- define "coralline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "coralline.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* every object's labels: {root, component} */}}
{{- define "coralline.labels" -}}
helm.sh/chart: {{ include "coralline.chart" .root }}
{{ include "coralline.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: coralline
{{- end -}}

{{/* the image of a component: {root, values} (values: the component's block) */}}
{{- define "coralline.image" -}}
{{- $g := .root.Values.image -}}
{{- $tag := .values.image.tag | default $g.tag | default .root.Chart.AppVersion -}}
{{- if eq $g.variant "cuda" }}{{ $tag = printf "%s-cuda" $tag }}{{ end -}}
{{- if $g.registry -}}
{{- printf "%s/%s:%s" $g.registry .values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "coralline.modelPath" -}}
{{- printf "/models/%s" .Values.model.name -}}
{{- end -}}

{{/* the Redis URL every component uses; the password (if any) comes from $(REDIS_PASSWORD) */}}
{{- define "coralline.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" (ne .Values.redis.auth.existingSecret "") -}}
{{- printf "redis://%s%s:%d/0" $auth (include "coralline.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) -}}
{{- else -}}
{{- required "redis.enabled is false: set redis.externalUrl (redis://host:port/db or rediss://...)" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* the same URL for the router's Serve config, where ${VAR} is expanded (router/app.py) */}}
{{- define "coralline.routerRedisUrl" -}}
{{- include "coralline.redisUrl" . | replace "$(REDIS_PASSWORD)" "${REDIS_PASSWORD}" -}}
{{- end -}}

{{/* env shared by the coralline containers: {root, service} */}}
{{- define "coralline.env" -}}
- name: CORALLINE_CACHE
  value: /var/cache/coralline
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- if .root.Values.redis.auth.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.redis.auth.existingSecret }}
      key: {{ .root.Values.redis.auth.secretKey }}
{{- end }}
{{- $t := .root.Values.telemetry }}
{{- if and $t.enabled (or $t.otlpEndpoint $t.collector.enabled) }}
- name: OTEL_SDK_DISABLED
  value: "false"
- name: OTEL_SERVICE_NAME
  value: {{ printf "coralline-%s" .service | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
{{- if $t.collector.enabled }}
- name: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
  value: {{ printf "http://%s:4317" (include "coralline.componentName" (dict "root" .root "component" "otel-collector")) | quote }}
- name: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
  value: grpc
{{- else }}
- name: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
  value: {{ $t.otlpEndpoint | quote }}
- name: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
  value: {{ $t.otlpProtocol | quote }}
{{- end }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $t.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $t.samplerArg | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.ip=$(POD_IP),k8s.namespace.name={{ .root.Release.Namespace }}"
{{- end }}
{{- end -}}

{{/* volumes every coralline pod mounts: a writable cache, /tmp, and the model */}}
{{- define "coralline.volumes" -}}
- name: cache
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if eq .Values.model.source "volume" }}
- name: models
  {{- required "model.source is volume: set model.volume (e.g. persistentVolumeClaim: {claimName: ...})" .Values.model.volume | toYaml | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "coralline.volumeMounts" -}}
- name: cache
  mountPath: /var/cache/coralline
- name: tmp
  mountPath: /tmp
{{- if eq .Values.model.source "volume" }}
- name: models
  mountPath: /models
  readOnly: true
{{- end }}
{{- end -}}

{{/* native gRPC probes on a port: {port, startupFailureThreshold} */}}
{{- define "coralline.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: {{ .startupFailureThreshold }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 4
{{- end -}}

{{/* the node selector of a GPU component: its own, plus the accelerator class */}}
{{- define "coralline.nodeSelector" -}}
{{- $sel := deepCopy (.nodeSelector | default dict) -}}
{{- if .accelerator -}}
{{- $_ := set $sel "nvidia.com/gpu.product" .accelerator -}}
{{- end -}}
{{- if $sel -}}
nodeSelector:
  {{- toYaml $sel | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* resources with the GPU count added: {resources, gpus} */}}
{{- define "coralline.resources" -}}
{{- $r := deepCopy (.resources | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := deepCopy ($r.limits | default dict) -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
resources:
  {{- toYaml $r | nindent 2 }}
{{- end -}}

{{/* a Ray pod template of the router: {root, c, node (head or workers block), name, head} */}}
{{- define "coralline.rayPod" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "coralline.labels" .c | nindent 4 }}
spec:
  serviceAccountName: {{ include "coralline.componentName" .c }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with .node.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .node.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .name }}
      image: {{ include "coralline.image" (dict "root" $root "values" $root.Values.router) }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      envFrom:
        - configMapRef:
            name: {{ include "coralline.fullname" $root }}
      env:
        {{- include "coralline.env" (dict "root" $root "service" "router") | nindent 8 }}
      ports:
        {{- if .head }}
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        {{- end }}
        - name: serve-grpc
          containerPort: {{ $root.Values.router.grpcPort }}
          protocol: TCP
        {{- if $root.Values.router.http.enabled }}
        - name: serve-http
          containerPort: {{ $root.Values.router.http.port }}
          protocol: TCP
        {{- end }}
      resources:
        {{- toYaml .node.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "coralline.volumeMounts" $root | nindent 8 }}
        - name: dshm
          mountPath: /dev/shm
  volumes:
    {{- include "coralline.volumes" $root | nindent 4 }}
    - name: dshm
      emptyDir:
        medium: Memory
{{- end -}}

{{/* a NetworkPolicy peer: the pods of one component of this release: {root, component} */}}
{{- define "coralline.peer" -}}
- podSelector:
    matchLabels:
      {{- include "coralline.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* the pod template of a drafter or verifier: {root, c, v, middle, tail}: v is the component's
values block, middle / tail the component's own arguments after --max-sessions and after
--metrics-port */}}
{{- define "coralline.workerTemplate" -}}
{{- $root := .root -}}
{{- $v := .v -}}
metadata:
  labels:
    {{- include "coralline.labels" .c | nindent 4 }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
spec:
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- include "coralline.nodeSelector" (dict "nodeSelector" $v.nodeSelector "accelerator" $v.accelerator) | nindent 2 }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .c.component }}
      image: {{ include "coralline.image" (dict "root" $root "values" $v) }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args:
        - --host=0.0.0.0
        - --port={{ $v.port }}
        - --model={{ include "coralline.modelPath" $root }}
        - --device={{ $v.device }}
        - --dtype={{ $root.Values.model.dtype }}
        - --max-sessions={{ $v.maxSessions }}
        {{- range .middle }}
        - {{ . }}
        {{- end }}
        - --metrics-port={{ $v.metricsPort }}
        {{- range .tail }}
        - {{ . }}
        {{- end }}
        {{- if eq $root.Values.router.discovery "redis" }}
        - --registry={{ include "coralline.redisUrl" $root }}
        - --advertise=$(POD_IP):{{ $v.port }}
        {{- end }}
        {{- range $v.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "coralline.fullname" $root }}
      env:
        - name: CORALLINE_THREADS
          value: {{ $v.threads | quote }}
        {{- include "coralline.env" (dict "root" $root "service" .c.component) | nindent 8 }}
      ports:
        - name: grpc
          containerPort: {{ $v.port }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $v.metricsPort }}
          protocol: TCP
      {{- include "coralline.grpcProbes" (dict "port" $v.port "startupFailureThreshold" $v.startupFailureThreshold) | nindent 6 }}
      {{- include "coralline.resources" (dict "resources" $v.resources "gpus" $v.gpus) | nindent 6 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "coralline.volumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "coralline.volumes" $root | nindent 4 }}
{{- end -}}
